// segvol-label: everything of the SegVol mode (segvol-mode.js) that depends on the OHIF build it
// runs in. Written for OHIF 3.10.0-beta.5 as bundled with MONAI Label 0.8.5: the version its About
// box reports (commit 32fe2623cfb5129a19ee07031dd50e79b530c7e0), served as app.bundle.af87d1dd396d277eac89.js.
// The webpack module ids, OHIF's extension and service ids, the MONAI Label panel's markup and the
// services torn down on leaving the mode are that build's; another build or version is refused
// loudly (a console error, the reason in the SegVol panel, a red bar on the page), never half run.
// The server sends this file first, then segvol-mode.js, after OHIF's app-config.js.
(function () {
  'use strict';
  const OHIF_VERSION = '3.10.0-beta.5';
  const APP_BUNDLE = 'app.bundle.af87d1dd396d277eac89.js';
  const MONAI_LABEL = '0.8.5';

  // The bundle's own modules, by their webpack ids in this build, each with a test that it is what
  // we take it for (an id of another build names another module).
  const MODULES = {
    react: { id: 86326, is: m => typeof m.createElement === 'function' && typeof m.useState === 'function' },
    '@cornerstonejs/tools': {
      id: 55139,
      is: m => typeof m.segmentation?.triggerSegmentationEvents?.triggerSegmentationDataModified === 'function',
    },
    '@cornerstonejs/core': { id: 81985, is: m => typeof m.cache?.getImage === 'function' && typeof m.metaData?.get === 'function' },
  };

  // OHIF's extension modules the mode is made of (checked when the mode starts).
  const IDS = {
    layout: '@ohif/extension-default.layoutTemplateModule.viewerLayout',
    seriesList: '@ohif/extension-default.panelModule.seriesList',
    monaiLabelPanel: '@ohif/extension-monai-label.panelModule.monailabel',
    segmentationPanel: '@ohif/extension-cornerstone.panelModule.panelSegmentationWithTools',
    viewport: '@ohif/extension-cornerstone.viewportModule.cornerstone',
    stack: '@ohif/extension-default.sopClassHandlerModule.stack',
    tools: '@ohif/extension-cornerstone.utilityModule.tools',
  };
  const EXTENSIONS = {
    '@ohif/extension-default': '^3.0.0',
    '@ohif/extension-cornerstone': '^3.0.0',
    '@ohif/extension-cornerstone-dicom-seg': '^3.0.0',
    '@ohif/extension-monai-label': '^3.0.0',
  };
  const LABELMAP = '1'; // the segmentation the MONAI Label panel creates and fills

  // ------------------------------------------------------------------ failing loudly
  const problems = [];
  const listeners = new Set();
  const headline = () =>
    `SegVol mode: written for OHIF ${OHIF_VERSION} (${APP_BUNDLE}) as bundled with MONAI Label ${MONAI_LABEL}; ` +
    'it does not run on this OHIF:';

  function fail(problem) {
    if (!problems.includes(problem)) {
      problems.push(problem);
      console.error(`[segvol-label] ${headline()} ${problem} (apps/segvol/static/ohif-shim.js)`);
      banner();
      listeners.forEach(f => f(problem));
    }
    return new Error(problem);
  }

  function banner() {
    if (!document.body) return document.addEventListener('DOMContentLoaded', banner, { once: true });
    let bar = document.getElementById('segvol-ohif-error');
    if (!bar) {
      bar = document.createElement('div');
      bar.id = 'segvol-ohif-error';
      bar.style.cssText =
        'position:fixed;left:0;right:0;bottom:0;z-index:100000;padding:6px 10px;background:#8b0000;color:white;font:13px sans-serif';
      document.body.appendChild(bar);
    }
    bar.textContent = `${headline()} ${problems.join(' ')}`;
  }

  // ------------------------------------------------------------------ the build
  // webpack's chunk runtime hands its require function to a pushed chunk's callback.
  let webpackRequire = null;
  (self.webpackChunk = self.webpackChunk || []).push([['segvol-label'], {}, r => (webpackRequire = r)]);
  const loaded = {};

  function bundleModule(name) {
    if (loaded[name]) return loaded[name];
    const { id, is } = MODULES[name];
    if (!webpackRequire) throw fail("OHIF's webpack runtime did not hand over its require function (self.webpackChunk).");
    let m = null;
    try {
      m = !webpackRequire.m || id in webpackRequire.m ? webpackRequire(id) : null;
    } catch (e) {
      throw fail(`webpack module ${id} (${name}) did not load: ${e.message}.`);
    }
    if (!m) throw fail(`webpack module ${id} (${name}) is not in this OHIF build.`);
    if (!is(m)) throw fail(`webpack module ${id} is not ${name} in this OHIF build.`);
    return (loaded[name] = m);
  }

  // This page's OHIF is the one this file was written for, and its React is where we take it from.
  let checked = false;
  function check() {
    if (checked || document.readyState === 'loading') return problems;
    checked = true;
    const bundle = [...document.scripts].map(s => s.src.split('/').pop()).find(n => n.startsWith('app.bundle.'));
    if (bundle !== APP_BUNDLE) {
      fail(`this page runs OHIF ${bundle ? 'from ' + bundle : '(no app.bundle script on the page)'}, another build.`);
    }
    try {
      bundleModule('react');
    } catch (e) {
      // fail() said why
    }
    return problems;
  }

  // A panel component that shows the problems instead of itself: with the bundle's React if that
  // is sound, else as plain text (a component may return a string) painted here, so the reason
  // shows in the panel in any case.
  const PROBLEM_STYLE = { padding: '10px', background: '#5a1a1a', color: 'white', fontSize: '13px' };
  function guard(Component) {
    return function SegVolPanel(props) {
      if (!check().length) return bundleModule('react').createElement(Component, props);
      const text = `${headline()} ${problems.join(' ')}`;
      if (loaded.react) return loaded.react.createElement('div', { id: 'segvol-ohif-problem', style: PROBLEM_STYLE }, text);
      setTimeout(() => paint(text));
      return text;
    };
  }

  function paint(text) {
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const el = node.parentElement;
      if (node.data === text && el && el.id !== 'segvol-ohif-error') {
        el.id = el.id || 'segvol-ohif-problem';
        Object.assign(el.style, PROBLEM_STYLE);
      }
    }
  }

  // ------------------------------------------------------------------ the mode's wiring
  let entered = null; // the services OHIF handed the mode (window.services is the same object)
  const services = () => window.services || entered;

  function enterMode(servicesManager, extensionManager) {
    entered = servicesManager.services;
    check();
    for (const id of Object.values(IDS)) {
      let entry = null;
      try {
        entry = extensionManager.getModuleEntry(id);
      } catch (e) {
        // missing
      }
      if (!entry) fail(`OHIF has no module ${id}.`);
    }
    return problems.length === 0;
  }

  // Leaving the mode: what OHIF's own modes tear down.
  function exitMode(servicesManager) {
    const s = servicesManager.services;
    s.uiDialogService.dismissAll();
    s.uiModalService.hide();
    s.toolGroupService.destroy();
    s.syncGroupService.destroy();
    s.segmentationService.destroy();
    s.cornerstoneViewportService.destroy();
  }

  // cornerstone3D's tool names and enums, as OHIF's cornerstone extension exports them
  function toolNames(extensionManager) {
    const entry = extensionManager.getModuleEntry(IDS.tools);
    if (!entry?.exports?.toolNames || !entry.exports.Enums) throw fail(`${IDS.tools} has no toolNames and Enums.`);
    return entry.exports;
  }

  // ------------------------------------------------------------------ the labelmap
  function labelmapVolume() {
    const s = services()?.segmentationService;
    return s && s.getSegmentation(LABELMAP) ? s.getLabelmapVolume(LABELMAP) : null;
  }
  const labelmapData = () => labelmapVolume()?.voxelManager.getCompleteScalarDataArray() || null;

  function setLabelmap(data) {
    labelmapVolume().voxelManager.setCompleteScalarDataArray(data);
    bundleModule('@cornerstonejs/tools').segmentation.triggerSegmentationEvents.triggerSegmentationDataModified(LABELMAP);
  }

  // the image in the active viewport
  function currentSeries() {
    const { displaySetService, viewportGridService } = services();
    const { viewports, activeViewportId } = viewportGridService.getState();
    const viewport = viewports.get(activeViewportId);
    const uid = viewport?.displaySetInstanceUIDs?.[0];
    const ds = uid ? displaySetService.getDisplaySetByUID(uid) : null;
    return ds ? { series: ds.SeriesInstanceUID, study: ds.StudyInstanceUID } : null;
  }

  // segment number in the page <-> label name (the MONAI panel numbers segments by name rank)
  function segmentsByName() {
    const seg = services().segmentationService.getSegmentation(LABELMAP);
    const out = {};
    for (const s of Object.values(seg?.segments || {})) {
      out[s.label] = s.segmentIndex;
    }
    return out;
  }

  function segmentLabel(index) {
    return services().segmentationService.getSegmentation(LABELMAP)?.segments?.[index]?.label;
  }

  const setActiveSegment = index => services().segmentationService.setActiveSegment(LABELMAP, index);

  // the labelmap's segments: index -> {label, color}; add one, remove one, colour one everywhere
  function segments() {
    const seg = services().segmentationService.getSegmentation(LABELMAP);
    const out = {};
    for (const s of Object.values(seg?.segments || {})) if (s) out[s.segmentIndex] = { label: s.label };
    return out;
  }
  const addSegment = (index, label, color) =>
    services().segmentationService.addSegment(LABELMAP, { segmentIndex: index, label, color: [...color, 255] });

  function setSegmentColor(index, color) {
    const { segmentationService } = services();
    for (const viewportId of segmentationService.getViewportIdsWithSegmentation(LABELMAP)) {
      segmentationService.setSegmentColor(viewportId, LABELMAP, index, [...color, 255]);
    }
  }

  // the active segment's index (the one the brush paints), or null
  function activeSegment() {
    const seg = services().segmentationService.getSegmentation(LABELMAP);
    const active = Object.values(seg?.segments || {}).find(s => s && s.active);
    return active ? active.segmentIndex : null;
  }

  // ------------------------------------------------------------------ geometry
  // The labelmap's grid (the CT volume's): voxel (i, j, k) <-> world millimetres.
  function grid() {
    const volume = labelmapVolume();
    if (!volume?.imageData) return null;
    const data = volume.imageData;
    return {
      dimensions: [...volume.dimensions],
      spacing: [...data.getSpacing()],
      toIndex: world => [...data.worldToIndex(world)],
      toWorld: ijk => [...data.indexToWorld(ijk)],
    };
  }

  // every cornerstone viewport of the layout: id, element, canvas <-> world, the camera
  function viewports() {
    const { viewportGridService, cornerstoneViewportService } = services();
    const out = [];
    for (const [id] of viewportGridService.getState().viewports) {
      const vp = cornerstoneViewportService.getCornerstoneViewport(id);
      if (vp?.element && vp.canvasToWorld) out.push({ id, viewport: vp, element: vp.element, canvas: vp.canvas });
    }
    return out;
  }

  function onLabelmapModified(callback) {
    const { segmentationService } = services();
    segmentationService.subscribe(segmentationService.EVENTS.SEGMENTATION_DATA_MODIFIED, ({ segmentationId }) => {
      if (segmentationId === LABELMAP) callback();
    });
  }

  // The labelmap on every viewport of the layout (the MONAI panel adds it to the active one only,
  // and a brush on a viewport without it paints nothing).
  function showLabelmapEverywhere() {
    const { segmentationService, viewportGridService } = services();
    if (!segmentationService.getSegmentation(LABELMAP)) return;
    for (const [viewportId] of viewportGridService.getState().viewports) {
      const reps = segmentationService.getSegmentationRepresentations(viewportId, { segmentationId: LABELMAP });
      if (!reps || !reps.length) segmentationService.addSegmentationRepresentation(viewportId, { segmentationId: LABELMAP });
    }
  }

  // SEG series are no images of this mode, yet OHIF's stack handler makes display sets of them
  // (listed with the CT; one put in an MPR viewport breaks the layout): they are dropped as they
  // come. Saved labels open through the workspace. Returns the unsubscribe function.
  function hideSegSeries() {
    const { displaySetService } = services();
    const drop = () =>
      displaySetService
        .getActiveDisplaySets()
        .filter(d => d.Modality === 'SEG')
        .forEach(d => displaySetService.deleteDisplaySet(d.displaySetInstanceUID));
    drop();
    return displaySetService.subscribe(displaySetService.EVENTS.DISPLAY_SETS_ADDED, () => setTimeout(drop)).unsubscribe;
  }

  // ------------------------------------------------------------------ MONAI Label's panel
  // It talks to the server in this cookie (it reads it when it mounts, and its first connect uses it).
  const pointMonaiLabelAt = url => (document.cookie = 'MONAILABEL_SERVER_URL=' + escape(url) + '; path=/');

  // Connected to ``url`` by its own form (again in 10 s if the server did not answer).
  function connectMonaiLabel(url) {
    const panel = document.querySelector('.monaiLabelPanel');
    const tried = Number(panel?.dataset.segvolConnected || 0);
    if (panel && !panel.querySelector('.subtitle') && Date.now() - tried > 10000) {
      panel.dataset.segvolConnected = String(Date.now());
      const input = panel.querySelector('#monailabelServerURL');
      if (input) input.value = url;
      panel.querySelector('table.settingsTable button.actionButton')?.click();
    }
  }

  // its stock "Active Learning" tab: the SegVol workspace replaces it (real round status, leases)
  function hideStockActiveLearning() {
    if (document.getElementById('segvol-style')) return;
    const style = document.createElement('style');
    style.id = 'segvol-style';
    style.textContent = '.monaiLabelPanel .tab:has(> #tab-1) { display: none; }';
    document.head.appendChild(style);
  }

  window.segvolOhif = {
    OHIF_VERSION,
    APP_BUNDLE,
    IDS,
    EXTENSIONS,
    LABELMAP,
    problems: () => [...problems],
    onProblem: f => listeners.add(f),
    fail,
    check,
    guard,
    react: () => bundleModule('react'),
    cornerstoneTools: () => bundleModule('@cornerstonejs/tools'),
    cornerstoneCore: () => bundleModule('@cornerstonejs/core'),
    services,
    enterMode,
    exitMode,
    toolNames,
    labelmapData,
    setLabelmap,
    currentSeries,
    segmentsByName,
    segmentLabel,
    setActiveSegment,
    segments,
    addSegment,
    setSegmentColor,
    activeSegment,
    grid,
    viewports,
    onLabelmapModified,
    showLabelmapEverywhere,
    hideSegSeries,
    pointMonaiLabelAt,
    connectMonaiLabel,
    hideStockActiveLearning,
  };
})();
