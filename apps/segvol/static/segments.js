// segvol-label: the SegVol mode's segments (sent after ohif-shim.js, before segvol-mode.js).
//
// The team's categories and the whole SegVol vocabulary with one colour per category
// (GET /segvol/categories: the same colours the server writes into each SEG as
// RecommendedDisplayCIELabValue); a segment found by name, added where missing and made active;
// which segment the brush paints, and whether the annotator chose it.
//
// The overlap rule of the whole app (the server's provenance counts by it, lib/team/provenance.py):
// a result replaces its own classes; every voxel that is free or holds one of the result's
// classes takes the result's value there, voxels of any other class keep theirs. MONAI Label's
// panel merges its results so; mergeResult() below does the same for the box prompt.
(function () {
  'use strict';
  const ohif = window.segvolOhif;
  if (!ohif) return;

  const catalog = {
    entries: [], // {index, name, colour, configured}
    byName: new Map(),
    async load() {
      if (this.entries.length) return;
      const r = await fetch('/segvol/categories');
      if (!r.ok) throw new Error(`the label catalogue did not load (${r.status})`);
      this.entries = await r.json();
      for (const e of this.entries) this.byName.set(e.name.toLowerCase(), e);
    },
    colour(name) {
      const e = this.byName.get(String(name).toLowerCase());
      if (e) return e.colour;
      let h = 0; // a name outside the vocabulary: a steady colour of its own
      for (const c of String(name)) h = (h * 31 + c.charCodeAt(0)) >>> 0;
      const hue = (h % 360) / 360;
      const f = n => Math.round(255 * (0.55 + 0.35 * Math.cos(2 * Math.PI * (hue + n / 3))));
      return [f(0), f(1), f(2)];
    },
    // the configured categories first, then any vocabulary name containing the query
    search(query, limit = 12) {
      const q = query.trim().toLowerCase();
      const hits = this.entries.filter(e => !q || e.name.toLowerCase().includes(q));
      return hits.slice(0, limit);
    },
  };

  const segments = {
    chosen: false, // the annotator (or a prompt, an opened label) picked the active segment
    indexOf(name) {
      return ohif.segmentsByName()[name] || null;
    },
    // the segment named ``name``, added with its colour where the labelmap has none
    ensure(name) {
      const known = this.indexOf(name);
      if (known) return known;
      const used = Object.keys(ohif.segments()).map(Number);
      const index = Math.max(0, ...used) + 1;
      if (index > 255) throw new Error('the labelmap holds 255 segments already');
      ohif.addSegment(index, name, catalog.colour(name));
      return index;
    },
    // ``name`` becomes the segment the brush paints (and the box prompt's class)
    choose(name) {
      const index = this.ensure(name);
      ohif.setActiveSegment(index);
      this.chosen = true;
      reveal(name);
      return index;
    },
    chooseIndex(index) {
      const label = ohif.segmentLabel(index);
      if (label) this.choose(label);
    },
    active() {
      const index = ohif.activeSegment();
      const label = index ? ohif.segmentLabel(index) : null;
      return label ? { index, label, colour: catalog.colour(label), chosen: this.chosen } : null;
    },
    // every segment in the team's colours (MONAI Label's panel colours them its own way)
    paint() {
      for (const [index, s] of Object.entries(ohif.segments())) {
        if (paintedAs[index] !== s.label) {
          ohif.setSegmentColor(Number(index), catalog.colour(s.label));
          paintedAs[index] = s.label;
        }
      }
    },
    reset() {
      this.chosen = false;
      for (const k of Object.keys(paintedAs)) delete paintedAs[k];
    },
  };
  const paintedAs = {};

  // OHIF's segment list scrolled to the segment (a long list hides it otherwise)
  function reveal(name) {
    setTimeout(() => {
      const panel = document.querySelector('[data-cy="panelSegmentationWithTools"]') || document.body;
      const row = [...panel.querySelectorAll('div, span')].find(e => e.childElementCount === 0 && e.textContent.trim() === name);
      if (row) row.scrollIntoView({ block: 'nearest' });
    }, 100);
  }

  // A result (``result``: nonzero where the class is) merged by the overlap rule as ``index``.
  function mergeResult(data, result, index) {
    let changed = 0;
    for (let i = 0; i < data.length; i++) {
      const v = data[i];
      if (v === 0 || v === index) {
        const w = result[i] ? index : 0;
        if (w !== v) {
          data[i] = w;
          changed++;
        }
      }
    }
    return changed;
  }

  // voxels -> the page's segments, by name (segments added where missing); returns the names
  function writeNamed(data, raw, names) {
    const lut = new Uint8Array(256);
    for (const [value, name] of Object.entries(names)) lut[Number(value)] = segments.ensure(name);
    for (let i = 0; i < raw.length; i++) data[i] = lut[raw[i]];
    return Object.values(names);
  }

  window.segvolSegments = { catalog, segments, mergeResult, writeNamed };
})();
