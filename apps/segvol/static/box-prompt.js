// segvol-label: the SegVol mode's 3D box prompt (sent after segments.js, before segvol-mode.js).
//
// SegVol's box is 3D. The annotator drags a rectangle on any of the three views; its extent
// across slices starts as deep as the rectangle's shorter side (in mm) around the slice in view
// and is set in the workspace (six voxel bounds, editable before Run). Clicks in point mode add
// positive or negative points. The box and points show in every view: the box's section on the
// slice in view (solid), or its outline when the slice lies outside it (dashed). Run sends the
// box, the points and (unless switched off) the active segment's name as the text prompt, in the
// plain REST parameters of /infer (box = [i0, j0, k0, i1, j1, k1], voxel indices, inclusive), and
// merges the answer into the labelmap as the active segment by the app's overlap rule.
(function () {
  'use strict';
  const ohif = window.segvolOhif;
  const parts = window.segvolSegments;
  if (!ohif || !parts) return;
  const SVG = 'http://www.w3.org/2000/svg';

  const box = {
    mode: null, // 'box', 'positive', 'negative' while the mouse draws on a view, else null
    lo: null, // [i, j, k] inclusive
    hi: null,
    points: [], // {ijk, positive}
    withText: true,
    listeners: new Set(),
    changed() {
      this.listeners.forEach(f => f(this.snapshot()));
    },
    snapshot() {
      return { mode: this.mode, lo: this.lo && [...this.lo], hi: this.hi && [...this.hi], points: this.points.length, withText: this.withText };
    },
    setMode(mode) {
      this.mode = this.mode === mode ? null : mode;
      this.changed();
    },
    clear() {
      Object.assign(this, { mode: null, lo: null, hi: null, points: [] });
      this.changed();
    },
    // one bound edited in the workspace: axis 0..2, end 'lo' or 'hi'
    setBound(axis, end, value) {
      const g = ohif.grid();
      if (!g || !this.lo || !Number.isFinite(value)) return;
      this[end][axis] = Math.max(0, Math.min(g.dimensions[axis] - 1, Math.round(value)));
      this.changed();
    },
    // the REST parameters of the prompt (null when there is nothing to send)
    params(name) {
      if (!this.lo && !this.points.length) return null;
      const p = {};
      if (this.lo) p.box = [0, 1, 2].map(a => Math.min(this.lo[a], this.hi[a])).concat([0, 1, 2].map(a => Math.max(this.lo[a], this.hi[a])));
      if (this.points.length) {
        p.points = this.points.map(x => x.ijk);
        p.point_labels = this.points.map(x => (x.positive ? 1 : 0));
      }
      if (this.withText && name) p.texts = [name];
      return p;
    },
  };

  // ------------------------------------------------------------------ the mouse on a view
  let drag = null;
  const viewportAt = target => ohif.viewports().find(v => v.element.contains(target));
  const canvasPoint = (v, e) => {
    const r = v.canvas.getBoundingClientRect();
    return [e.clientX - r.left, e.clientY - r.top];
  };
  const toIndex = (g, v, e) => g.toIndex(v.viewport.canvasToWorld(canvasPoint(v, e)));
  const clip = (g, ijk) => ijk.map((x, a) => Math.max(0, Math.min(g.dimensions[a] - 1, Math.round(x))));

  function onDown(e) {
    if (!box.mode || e.button !== 0) return;
    const v = viewportAt(e.target);
    const g = ohif.grid();
    if (!v || !g) return;
    e.stopPropagation();
    e.preventDefault();
    const at = toIndex(g, v, e);
    if (box.mode !== 'box') {
      box.points.push({ ijk: clip(g, at), positive: box.mode === 'positive' });
      return box.changed();
    }
    drag = { v, g, start: at };
  }

  function onMove(e) {
    if (!drag) return;
    e.stopPropagation();
    e.preventDefault();
    span(drag.g, drag.start, toIndex(drag.g, drag.v, e));
  }

  function onUp(e) {
    if (!drag) return;
    e.stopPropagation();
    e.preventDefault();
    span(drag.g, drag.start, toIndex(drag.g, drag.v, e));
    drag = null;
    box.mode = null;
    box.changed();
  }

  // the rectangle from ``a`` to ``b`` on the view's plane, as deep as its shorter side in mm
  function span(g, a, b) {
    const normal = sliceOf(g, drag.v).axis;
    const extent = [0, 1, 2].map(x => Math.abs(a[x] - b[x]) * g.spacing[x]);
    const side = Math.min(...extent.filter((_, x) => x !== normal));
    const half = Math.max(0, Math.round(side / g.spacing[normal] / 2));
    const lo = [0, 1, 2].map(x => (x === normal ? a[x] - half : Math.min(a[x], b[x])));
    const hi = [0, 1, 2].map(x => (x === normal ? a[x] + half : Math.max(a[x], b[x])));
    box.lo = clip(g, lo);
    box.hi = clip(g, hi);
    box.changed();
  }

  for (const [type, handler] of [
    ['mousedown', onDown],
    ['mousemove', onMove],
    ['mouseup', onUp],
  ]) {
    document.addEventListener(type, handler, true); // ahead of cornerstone's tools on the view
  }

  // ------------------------------------------------------------------ drawn in every view
  function overlay(v) {
    let svg = v.element.querySelector('svg.segvol-box');
    if (!svg) {
      svg = document.createElementNS(SVG, 'svg');
      svg.setAttribute('class', 'segvol-box');
      svg.style.cssText = 'position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none;z-index:10';
      v.element.appendChild(svg);
    }
    return svg;
  }

  // the view's slice axis (i, j or k) and the slice in view
  function sliceOf(g, v) {
    const cam = v.viewport.getCamera();
    const origin = g.toIndex(cam.focalPoint);
    const ahead = g.toIndex(cam.focalPoint.map((x, n) => x + cam.viewPlaneNormal[n]));
    const step = ahead.map((x, n) => Math.abs(x - origin[n]));
    const axis = step.indexOf(Math.max(...step));
    return { axis, at: origin[axis] };
  }

  function draw() {
    try {
      if (location.pathname.replace(/\/+$/, '').endsWith('/segvol')) drawViews();
    } catch (e) {
      if (!draw.failed) console.warn('[segvol-label] the box overlay was not drawn:', e.message);
      draw.failed = true;
    }
    requestAnimationFrame(draw);
  }

  function drawViews() {
    const g = ohif.grid();
    for (const v of g ? ohif.viewports() : []) {
      const svg = overlay(v);
      svg.replaceChildren();
      if (!box.lo && !box.points.length) continue;
      const { axis, at } = sliceOf(g, v);
      const canvas = ijk => v.viewport.worldToCanvas(g.toWorld(ijk));
      if (box.lo) {
        const [u, w] = [0, 1, 2].filter(x => x !== axis);
        const lo = [0, 1, 2].map(x => Math.min(box.lo[x], box.hi[x]) - 0.5);
        const hi = [0, 1, 2].map(x => Math.max(box.lo[x], box.hi[x]) + 0.5);
        const inside = at >= lo[axis] && at <= hi[axis];
        const corner = (cu, cw) => {
          const p = [0, 0, 0];
          p[axis] = at;
          p[u] = cu;
          p[w] = cw;
          return canvas(p);
        };
        const poly = document.createElementNS(SVG, 'polygon');
        poly.setAttribute('points', [corner(lo[u], lo[w]), corner(hi[u], lo[w]), corner(hi[u], hi[w]), corner(lo[u], hi[w])].map(p => p.join(',')).join(' '));
        poly.setAttribute('fill', inside ? 'rgba(255,200,0,0.08)' : 'none');
        poly.setAttribute('stroke', '#ffc800');
        poly.setAttribute('stroke-width', inside ? '2' : '1');
        if (!inside) poly.setAttribute('stroke-dasharray', '4 4');
        poly.setAttribute('data-segvol', inside ? 'box-section' : 'box-outline');
        svg.appendChild(poly);
      }
      for (const p of box.points) {
        if (Math.abs(p.ijk[axis] - at) > 0.5) continue;
        const [x, y] = canvas(p.ijk);
        const dot = document.createElementNS(SVG, 'circle');
        Object.entries({ cx: x, cy: y, r: 5, fill: p.positive ? '#3c3' : '#e33', stroke: 'white' }).forEach(([k, val]) => dot.setAttribute(k, val));
        svg.appendChild(dot);
      }
    }
  }
  requestAnimationFrame(draw);

  // ------------------------------------------------------------------ running it
  // The NRRD the server answers (raw encoding: result_compress false): its voxels.
  function nrrdVoxels(buffer) {
    const bytes = new Uint8Array(buffer);
    let end = -1;
    for (let i = 0; i + 1 < bytes.length && i < 65536; i++) {
      if (bytes[i] === 10 && bytes[i + 1] === 10) {
        end = i + 2;
        break;
      }
    }
    if (end < 0) throw new Error('the answer is not an NRRD file');
    const header = new TextDecoder().decode(bytes.subarray(0, end));
    const encoding = (header.match(/^encoding:\s*(\S+)/m) || [])[1];
    if (encoding !== 'raw') throw new Error(`the answer's NRRD encoding is ${encoding}, expected raw`);
    return bytes.subarray(end);
  }

  async function run(series, client) {
    const active = parts.segments.active();
    if (!active || !active.chosen) throw new Error('choose the segment the box is for first (the list or Find a structure)');
    const prompt = box.params(active.label);
    if (!prompt) throw new Error('draw a box (or place points) first');
    const params = { ...prompt, client_id: client, result_extension: '.nrrd', result_dtype: 'uint8', result_compress: false };
    const form = new FormData();
    form.append('params', JSON.stringify(params));
    const r = await fetch(`/infer/segvol?image=${encodeURIComponent(series)}&output=image`, { method: 'POST', body: form });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(`${r.status}: ${body.detail || r.statusText}`);
    }
    const result = nrrdVoxels(await r.arrayBuffer());
    const data = ohif.labelmapData();
    if (result.length !== data.length) throw new Error(`the answer has ${result.length} voxels, the image ${data.length}`);
    const changed = parts.mergeResult(data, result, active.index);
    return { params, changed, segment: active.label, data };
  }

  window.segvolBox = { box, run };
})();
