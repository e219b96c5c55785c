// segvol-label: a "Save label" button for OHIF's monai-label mode, whose stock panel has no save
// action. It sends the page's labelmap as the image's final label through MONAI Label
// (PUT /datastore/label, raw uint8 labelmap as label.bin, one label_info name per value); the
// server stores it in the archive as a DICOM SEG with the right geometry.
(function () {
  const ID = 'segvol-save-label';

  function say(text, ok) {
    const b = document.getElementById(ID);
    b.textContent = text;
    b.style.background = ok ? '#1f7a1f' : '#8b1a1a';
    setTimeout(() => { b.textContent = 'Save label (final)'; b.style.background = '#0a5d8a'; }, 6000);
  }

  async function save() {
    const s = window.services;
    const volume = s.segmentationService.getLabelmapVolume('1');
    if (!volume) return say('No segmentation yet', false);
    const data = volume.voxelManager.getCompleteScalarDataArray();
    const values = [...new Set(data)].filter(v => v).sort((a, b) => a - b);
    if (!values.length) return say('The segmentation is empty', false);
    const segments = s.segmentationService.getSegmentation('1').segments;
    const series = s.displaySetService.getActiveDisplaySets().find(d => d.Modality !== 'SEG').SeriesInstanceUID;
    const form = new FormData();
    form.append('params', JSON.stringify({label_info: values.map(v => ({name: segments[v].label}))}));
    form.append('label', new Blob([new Uint8Array(data.buffer, data.byteOffset, data.byteLength)]), 'label.bin');
    const r = await fetch(`/datastore/label?image=${encodeURIComponent(series)}&tag=final`, {method: 'PUT', body: form});
    if (r.ok) return say('Saved to the archive', true);
    let detail = '';
    try { detail = (await r.json()).detail; } catch (e) { detail = r.statusText; }
    say(`Not saved (${r.status}): ${detail}`, false);
  }

  function mount() {
    if (document.getElementById(ID) || !window.services || !location.pathname.includes('/ohif/monai-label')) return;
    const b = document.createElement('button');
    b.id = ID;
    b.textContent = 'Save label (final)';
    b.title = 'Store the current segmentation as the final label of this series (DICOM SEG in the archive)';
    b.style.cssText = 'position:fixed;left:12px;bottom:12px;z-index:10000;padding:6px 12px;border-radius:4px;' +
      'border:0;color:white;background:#0a5d8a;font-size:13px;cursor:pointer;max-width:420px';
    b.onclick = save;
    document.body.appendChild(b);
  }

  setInterval(mount, 1000);
})();
