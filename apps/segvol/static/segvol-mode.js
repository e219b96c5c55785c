// segvol-label: the SegVol mode for OHIF 3.10 as bundled in MONAI Label 0.8.5, added through
// app-config.js (no OHIF fork, no rebuild). Route /ohif/segvol?StudyInstanceUIDs=...
//
// Left: the SegVol workspace panel (annotator, next image, save, undo, model and round status,
// the image's saved labels). Right: MONAI Label's panel (class and point prompts) and OHIF's
// segmentation panel with its editing tools (brush, eraser, threshold brush, scissors) on the
// labelmap that SegVol fills. Why these pieces, and the OHIF 3.10 bugs they avoid: README,
// "Annotating in OHIF".
//
// What depends on the OHIF build (webpack module ids, OHIF's extension and service ids, the MONAI
// Label panel's markup) is in ohif-shim.js, sent before this file: window.segvolOhif.
(function () {
  'use strict';
  const config = window.config;
  const ohif = window.segvolOhif;
  if (!ohif) return console.error('[segvol-label] SegVol mode: ohif-shim.js was not loaded before segvol-mode.js');
  const ROUTE = 'segvol';
  const EXTENSION = '@segvol-label/extension';
  const ANNOTATOR_KEY = 'segvol-label.annotator';
  const STRATEGY_KEY = 'segvol-label.strategy';
  const MAX_UNDO = 30;
  const { currentSeries, labelmapData, segmentLabel, segmentsByName, setLabelmap } = ohif;

  const onSegVolPage = () => location.pathname.replace(/\/+$/, '').endsWith('/' + ROUTE);

  // ------------------------------------------------------------------ who is annotating
  function annotator() {
    let name = localStorage.getItem(ANNOTATOR_KEY);
    if (!name) {
      name = 'annotator-' + Math.random().toString(16).slice(2, 6);
      localStorage.setItem(ANNOTATOR_KEY, name);
    }
    return name;
  }

  // Every MONAI Label request of this page carries the annotator as client_id (OHIF's panel sends
  // none): the server leases images, records results and names the SEG's creator by it.
  const TAGGED = /\/(infer|activelearning|datastore\/label|train)(\/|$)/;
  const xhrOpen = XMLHttpRequest.prototype.open;
  const xhrSend = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.open = function (method, url) {
    this.segvolUrl = new URL(String(url), location.href);
    return xhrOpen.apply(this, arguments);
  };
  XMLHttpRequest.prototype.send = function (body) {
    const url = this.segvolUrl;
    if (url && url.origin === location.origin && TAGGED.test(url.pathname)) {
      body = withClient(body);
      if (url.pathname.includes('/infer/')) {
        const params = paramsOf(body);
        this.addEventListener('load', () => this.status === 200 && workspace.onResult(params));
      }
    }
    return xhrSend.call(this, body);
  };

  function paramsOf(body) {
    try {
      return JSON.parse(body instanceof FormData ? body.get('params') || '{}' : body || '{}');
    } catch (e) {
      return {};
    }
  }

  function withClient(body) {
    if (body instanceof FormData) {
      const params = paramsOf(body);
      params.client_id = params.client_id || annotator();
      body.set('params', JSON.stringify(params));
      return body;
    }
    if (typeof body === 'string' || body == null) {
      const params = paramsOf(body);
      if (params && typeof params === 'object' && !Array.isArray(params)) {
        params.client_id = params.client_id || annotator();
        return JSON.stringify(params);
      }
    }
    return body;
  }

  // ------------------------------------------------------------------ the labelmap
  // Edits are undone step by step: each settled change of the labelmap (a brush or eraser
  // stroke, a scissors cut, a SegVol result, an opened label) is kept as the voxels it changed.
  const history = {
    baseline: null,
    steps: [],
    saved: null,
    reset(data) {
      this.baseline = new Uint8Array(data);
      this.steps = [];
    },
    record(data) {
      if (!this.baseline || this.baseline.length !== data.length) {
        this.reset(data);
        return false;
      }
      const idx = [];
      const before = [];
      for (let i = 0; i < data.length; i++) {
        if (data[i] !== this.baseline[i]) {
          idx.push(i);
          before.push(this.baseline[i]);
          this.baseline[i] = data[i];
        }
      }
      if (!idx.length) return false;
      this.steps.push({ idx: Uint32Array.from(idx), before: Uint8Array.from(before) });
      if (this.steps.length > MAX_UNDO) this.steps.shift();
      return true;
    },
    undo() {
      const step = this.steps.pop();
      if (!step) return false;
      const data = labelmapData();
      for (let n = 0; n < step.idx.length; n++) {
        data[step.idx[n]] = step.before[n];
        this.baseline[step.idx[n]] = step.before[n];
      }
      setLabelmap(data);
      return true;
    },
    dirty(data) {
      if (!this.saved || this.saved.length !== data.length) return data.some(v => v);
      for (let i = 0; i < data.length; i++) if (data[i] !== this.saved[i]) return true;
      return false;
    },
  };

  // ------------------------------------------------------------------ the server
  async function api(path, options = {}) {
    const r = await fetch(path, options);
    let body = null;
    const type = r.headers.get('content-type') || '';
    if (type.includes('json')) body = await r.json();
    else if (type.includes('octet-stream')) body = await r.arrayBuffer();
    else body = await r.text();
    if (!r.ok) {
      const detail = body && body.detail ? body.detail : r.statusText;
      throw new Error(`${r.status}: ${typeof detail === 'string' ? detail : JSON.stringify(detail)}`);
    }
    return { body, headers: r.headers };
  }

  // ------------------------------------------------------------------ the workspace
  const workspace = {
    listeners: new Set(),
    state: {
      message: '',
      ok: true,
      status: null,
      history: [],
      busy: '',
      strategy: localStorage.getItem(STRATEGY_KEY) || 'uncertainty',
      strategies: ['uncertainty'],
      canUndo: false,
    },
    labels: {}, // /info label index -> name
    set(patch) {
      Object.assign(this.state, patch);
      this.listeners.forEach(f => f({ ...this.state }));
    },
    say(message, ok = true) {
      this.set({ message, ok });
    },

    async info() {
      if (Object.keys(this.labels).length) return;
      const { body } = await api('/info/');
      const model = body.models && body.models.segvol;
      for (const [name, idx] of Object.entries((model && model.labels) || {})) this.labels[idx] = name;
      this.set({ strategies: Object.keys(body.strategies || {}) });
    },

    async refresh() {
      const where = currentSeries();
      const q = new URLSearchParams({ client_id: annotator() });
      if (where) q.set('image', where.series);
      if (where && where.series !== this.historyOf) this.loadHistory(); // a new image in view
      try {
        const { body } = await api('/segvol/status?' + q);
        this.set({ status: body });
      } catch (e) {
        this.set({ status: { error: String(e.message || e) } });
      }
    },

    async loadHistory() {
      const where = currentSeries();
      if (!where) return;
      this.historyOf = where.series;
      try {
        const { body } = await api('/segvol/labels?image=' + encodeURIComponent(where.series));
        this.set({ history: body });
      } catch (e) {
        this.set({ history: [] });
      }
    },

    onResult(params) {
      // the class just prompted becomes the segment the editing tools paint
      const prompted = params.label_prompt && params.label_prompt.length ? params.label_prompt[0] : null;
      setTimeout(() => {
        const name = this.labels[prompted];
        const index = name ? segmentsByName()[name] : null;
        if (index) ohif.setActiveSegment(index);
        this.refresh();
      }, 300);
    },

    async nextImage() {
      const edited = labelmapData();
      if (edited && history.dirty(edited)) {
        if (!window.confirm('This image has edits that are not saved. Leave it anyway?')) return;
      }
      this.set({ busy: 'next' });
      this.say(`Asking the server for the next image (${this.state.strategy})...`);
      try {
        const { body } = await api('/activelearning/' + encodeURIComponent(this.state.strategy), {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ client_id: annotator() }),
        });
        if (!body || !body.id) {
          this.say(body && body.message ? body.message : 'Nothing left to annotate.', true);
          return;
        }
        if (!body.StudyInstanceUID) throw new Error(`the server named image ${body.id} without its study`);
        sessionStorage.setItem('segvol-label.note', body.note || '');
        const q = new URLSearchParams({
          StudyInstanceUIDs: body.StudyInstanceUID,
          initialSeriesInstanceUID: body.id,
        });
        location.assign(`${config.routerBasename.replace(/\/$/, '')}/${ROUTE}?${q}`);
      } catch (e) {
        this.say(`Next image failed: ${e.message}`, false);
      } finally {
        this.set({ busy: '' });
      }
    },

    async save() {
      const data = labelmapData();
      const where = currentSeries();
      if (!data || !where) return this.say('No segmentation yet: run a prompt first.', false);
      const present = new Set();
      for (let i = 0; i < data.length; i++) if (data[i]) present.add(data[i]);
      const values = [...present].sort((a, b) => a - b);
      if (!values.length) return this.say('The segmentation is empty: nothing to save.', false);
      const form = new FormData();
      const labelInfo = values.map(v => ({ name: segmentLabel(v) || `segment ${v}` }));
      form.append('params', JSON.stringify({ label_info: labelInfo, client_id: annotator() }));
      form.append('label', new Blob([new Uint8Array(data.buffer, data.byteOffset, data.byteLength)]), 'label.bin');
      this.set({ busy: 'save' });
      this.say('Saving...');
      const t0 = performance.now();
      try {
        const { body } = await api(`/datastore/label?image=${encodeURIComponent(where.series)}&tag=final`, {
          method: 'PUT',
          body: form,
        });
        history.saved = new Uint8Array(data);
        const kinds = (body.segments || []).map(s => {
          const edit = s.type === 'SEMIAUTOMATIC' ? ` +${s.added}/−${s.removed} voxels` : '';
          return `${s.name}: ${s.type}${edit}`;
        });
        const seconds = ((performance.now() - t0) / 1000).toFixed(1);
        this.say(`Saved to the archive in ${seconds} s as ${body.client || annotator()} (${kinds.join('; ')}).`);
        window.segvolLastSave = { seconds: Number(seconds), response: body };
        this.loadHistory();
        this.refresh();
      } catch (e) {
        this.say(`Not saved: ${e.message}`, false);
      } finally {
        this.set({ busy: '' });
      }
    },

    async open(entry) {
      const where = currentSeries();
      if (!where || !labelmapData()) return this.say('Connect the MONAI Label panel first (it creates the labelmap).', false);
      this.set({ busy: 'open' });
      try {
        const q = new URLSearchParams({ image: where.series });
        if (entry && entry.seg_series) q.set('seg', entry.seg_series);
        const { body, headers } = await api('/segvol/labels/voxels?' + q);
        const names = JSON.parse(headers.get('X-SegVol-Labels') || '{}');
        const bySegment = segmentsByName();
        const lut = new Uint8Array(256);
        const missing = [];
        for (const [value, name] of Object.entries(names)) {
          if (bySegment[name]) lut[Number(value)] = bySegment[name];
          else missing.push(name);
        }
        const raw = new Uint8Array(body);
        const data = labelmapData();
        if (raw.length !== data.length) throw new Error(`the label has ${raw.length} voxels, the image ${data.length}`);
        for (let i = 0; i < raw.length; i++) data[i] = lut[raw[i]];
        setLabelmap(data);
        history.saved = new Uint8Array(data);
        const who = entry ? entry.client || entry.creator || 'unknown' : 'final label';
        this.say(
          `Opened the ${entry && entry.draft ? 'draft (not a final label until you save it)' : 'label'} saved by ${who}${entry && entry.time ? ' at ' + entry.time : ''}: edit it and save a new version.` +
            (missing.length ? ` Not shown (no such segment here): ${missing.join(', ')}.` : '')
        );
      } catch (e) {
        this.say(`Could not open the label: ${e.message}`, false);
      } finally {
        this.set({ busy: '' });
      }
    },

    undo() {
      if (!history.undo()) this.say('Nothing to undo.', false);
      this.set({ canUndo: history.steps.length > 0 });
    },

    async startRound() {
      this.set({ busy: 'round' });
      try {
        await api('/train/segvol', {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ client_id: annotator() }),
        });
        this.say('Fine-tune round started: its progress shows below.');
      } catch (e) {
        this.say(`The round did not start: ${e.message}`, false);
      } finally {
        this.set({ busy: '' });
        this.refresh();
      }
    },
  };
  window.segvolWorkspace = workspace;
  ohif.onProblem(problem => workspace.say(`This OHIF does not fit the SegVol mode: ${problem}`, false));

  // ------------------------------------------------------------------ page upkeep
  // The labelmap on every viewport of the layout; MONAI Label's panel connected to this server.
  function upkeep() {
    if (!onSegVolPage() || !ohif.services()) return;
    ohif.showLabelmapEverywhere();
    ohif.connectMonaiLabel(serverUrl());
  }

  // MONAI Label's panel talks to the server that serves this page.
  const serverUrl = () => location.origin + '/';
  const pointPanelAtUs = () => ohif.pointMonaiLabelAt(serverUrl());
  if (onSegVolPage()) pointPanelAtUs();

  // A change is recorded once it settles: not while the mouse is down (a stroke in progress).
  let settleTimer = null;
  let mouseDown = false;
  let pending = false;
  function settle() {
    clearTimeout(settleTimer);
    settleTimer = setTimeout(() => {
      const data = labelmapData();
      if (!data) return;
      if (mouseDown) {
        pending = true;
        return;
      }
      pending = false;
      if (history.record(data)) {
        workspace.set({ canUndo: history.steps.length > 0 });
      }
    }, 250);
  }
  const watchEdits = () => ohif.onLabelmapModified(settle);
  document.addEventListener('mousedown', () => (mouseDown = true), true);
  document.addEventListener(
    'mouseup',
    () => {
      mouseDown = false;
      if (pending) settle();
    },
    true
  );
  document.addEventListener('keydown', e => {
    if (onSegVolPage() && (e.ctrlKey || e.metaKey) && e.key === 'z' && !/INPUT|TEXTAREA/.test(e.target.tagName)) {
      e.preventDefault();
      workspace.undo();
    }
  });

  // ------------------------------------------------------------------ the panel
  function WorkspacePanel() {
    const { createElement: h, useEffect, useState } = ohif.react();
    const [state, setState] = useState({ ...workspace.state });
    const [name, setName] = useState(annotator());
    useEffect(() => {
      workspace.listeners.add(setState);
      workspace.info().catch(e => workspace.say(`Cannot reach the server: ${e.message}`, false));
      workspace.refresh();
      workspace.loadHistory();
      const note = sessionStorage.getItem('segvol-label.note');
      if (note) {
        workspace.say(`Note: ${note}`, false);
        sessionStorage.removeItem('segvol-label.note');
      }
      const timer = setInterval(() => workspace.refresh(), 3000);
      return () => {
        workspace.listeners.delete(setState);
        clearInterval(timer);
      };
    }, []);
    const s = state.status || {};
    const round = s.round;
    const last = s.last_round;
    const button = (id, label, onClick, disabled) =>
      h(
        'button',
        {
          id,
          onClick,
          disabled: !!disabled || !!state.busy,
          style: {
            padding: '5px 10px',
            margin: '0 6px 6px 0',
            borderRadius: 4,
            border: 0,
            background: disabled || state.busy ? '#3a4a5a' : '#0a5d8a',
            color: 'white',
            cursor: 'pointer',
          },
        },
        label
      );
    const row = (label, value, id) =>
      h('div', { style: { margin: '3px 0' } }, h('span', { style: { color: '#9ab' } }, label + ' '), h('span', { id }, value));
    const pct = round && round.total ? Math.round((100 * round.done) / round.total) : 0;
    return h(
      'div',
      { id: 'segvol-workspace', style: { padding: 10, color: 'white', fontSize: 13, overflowY: 'auto' } },
      h('div', { style: { fontWeight: 'bold', fontSize: 15, marginBottom: 8 } }, 'SegVol workspace'),
      h(
        'label',
        { style: { display: 'block', marginBottom: 8 } },
        'Annotator ',
        h('input', {
          id: 'segvol-annotator',
          value: name,
          onChange: e => setName(e.target.value),
          onBlur: () => {
            if (name.trim()) localStorage.setItem(ANNOTATOR_KEY, name.trim());
            workspace.refresh();
          },
          style: { width: '100%', color: 'black', padding: 3 },
        })
      ),
      h(
        'div',
        null,
        button('segvol-next', 'Next image', () => workspace.nextImage()),
        button('segvol-save', 'Save label', () => workspace.save()),
        button('segvol-undo', 'Undo', () => workspace.undo(), !state.canUndo)
      ),
      h(
        'label',
        { style: { display: 'block', marginBottom: 6, color: '#9ab' } },
        'Next image by ',
        h(
          'select',
          {
            id: 'segvol-strategy',
            value: state.strategy,
            onChange: e => {
              localStorage.setItem(STRATEGY_KEY, e.target.value);
              workspace.set({ strategy: e.target.value });
            },
            style: { color: 'black' },
          },
          state.strategies.map(n => h('option', { key: n, value: n }, n))
        )
      ),
      h(
        'div',
        {
          id: 'segvol-message',
          style: { minHeight: 36, margin: '6px 0', padding: 6, borderRadius: 4, background: state.ok ? '#163a24' : '#5a1a1a' },
        },
        state.message || 'Ready.'
      ),
      h('hr', { style: { borderColor: '#345', margin: '8px 0' } }),
      row('Model:', s.model_version || '...', 'segvol-model'),
      s.warning ? h('div', { style: { color: '#fc6', fontSize: 11 } }, s.warning) : null,
      s.error ? h('div', { style: { color: '#f88' } }, s.error) : null,
      row(
        'Your image:',
        !s.lease
          ? 'none leased'
          : s.lease.image === currentSeries()?.series
            ? `held by you for ${Math.ceil(s.lease.seconds_left / 60)} min more`
            : `you hold another image (${s.lease.image.slice(-12)}) for ${Math.ceil(s.lease.seconds_left / 60)} min`,
        'segvol-lease'
      ),
      (s.image_held_by || []).length
        ? h(
            'div',
            { id: 'segvol-held-by', style: { color: '#fc6' } },
            `${s.image_held_by.map(l => l.client).join(', ')} also has this image (leased until ` +
              `${s.image_held_by.map(l => l.until.slice(11, 16)).join(', ')}): your saves may cross.`
          )
        : null,
      s.last_result
        ? row(
            'Last result:',
            `${Object.keys(s.last_result.labels).join(', ')} by model ${s.last_result.model_version} ` +
              `in ${Number(s.last_result.seconds).toFixed(2)} s`,
            'segvol-last-result'
          )
        : null,
      h('hr', { style: { borderColor: '#345', margin: '8px 0' } }),
      h('div', { style: { fontWeight: 'bold' } }, 'Fine-tune rounds'),
      round && round.state === 'running'
        ? h(
            'div',
            { id: 'segvol-round' },
            round.total
              ? `Running: ${round.stage} ${round.done}/${round.total}` + (round.stage === 'fine-tune' ? ' steps' : '')
              : `Running: ${round.stage}...`,
            h(
              'div',
              { style: { background: '#234', height: 8, borderRadius: 4, marginTop: 4 } },
              h('div', { style: { background: '#e80', width: pct + '%', height: 8, borderRadius: 4 } })
            )
          )
        : h(
            'div',
            { id: 'segvol-round' },
            round && round.state === 'failed'
              ? `The last round failed: ${round.error}`
              : round && round.state === 'interrupted'
                ? 'The last round was interrupted.'
                : 'No round running.'
          ),
      last ? h('div', { id: 'segvol-last-round', style: { marginTop: 4 } }, describeRound(last)) : null,
      h('div', { style: { marginTop: 6 } }, button('segvol-train', 'Start a round', () => workspace.startRound(), round && round.state === 'running')),
      h('hr', { style: { borderColor: '#345', margin: '8px 0' } }),
      h('div', { style: { fontWeight: 'bold' } }, 'Saved labels of this image'),
      state.history.length
        ? h(
            'ul',
            { id: 'segvol-history', style: { paddingLeft: 0, listStyle: 'none' } },
            state.history.map((e, n) =>
              h(
                'li',
                { key: e.seg_series || n, style: { margin: '4px 0', borderBottom: '1px solid #234', paddingBottom: 4 } },
                h('div', null, `${e.draft ? 'DRAFT · ' : ''}${e.time || e.archived} by ${e.client || e.creator || 'unknown'}${n === 0 ? ' (newest)' : ''}`),
                h(
                  'div',
                  { style: { color: '#9ab', fontSize: 11 } },
                  (e.segments || []).map(x => `${x.name} ${x.type}`).join(', ') +
                    (e.model_version ? ` · model ${e.model_version}` : e.description ? ` · ${e.description}` : '')
                ),
                button('segvol-open-' + n, 'Open', () => workspace.open(e))
              )
            )
          )
        : h('div', { style: { color: '#9ab' } }, 'None yet.')
    );
  }

  function describeRound(r) {
    if (r.status === 'skipped') return `The last round did nothing: ${r.reason}.`;
    const dice = x => (typeof x === 'number' ? x.toFixed(3) : '?');
    const labels = r.labels || [];
    const held = labels.filter(l => l.held_out).length;
    const data = `Trained on ${labels.length - held} image(s), measured on ${held} held-out; ${r.steps} steps in ${r.seconds} s.`;
    const scores = `held-out Dice ${dice(r.val_dice_before)} → ${dice(r.val_dice_after)}, replay Dice ${dice(r.replay_dice)}`;
    if (r.status === 'promoted') return `${r.version} promoted, served from the next prompt: ${scores}. ${data}`;
    const why = (r.status || 'not promoted').replace(/^rejected: /, '');
    const heldOut = why.includes('held-out') ? '' : `; held-out Dice ${dice(r.val_dice_before)} → ${dice(r.val_dice_after)}`;
    return `${r.version} rejected, not served: ${why}${heldOut}. ${data}`;
  }

  // ------------------------------------------------------------------ tools and buttons
  // Editing tools (the names are cornerstone3D's; the Segmentation mode wires the same ones).
  function initToolGroups(extensionManager, toolGroupService) {
    const { toolNames, Enums } = ohif.toolNames(extensionManager);
    const brush = (toolName, activeStrategy) => ({ toolName, parentTool: 'Brush', configuration: { activeStrategy } });
    const tools = () => ({
      active: [
        { toolName: toolNames.WindowLevel, bindings: [{ mouseButton: Enums.MouseBindings.Primary }] },
        { toolName: toolNames.Pan, bindings: [{ mouseButton: Enums.MouseBindings.Auxiliary }] },
        { toolName: toolNames.Zoom, bindings: [{ mouseButton: Enums.MouseBindings.Secondary }] },
        { toolName: toolNames.StackScroll, bindings: [{ mouseButton: Enums.MouseBindings.Wheel }] },
      ],
      passive: [
        brush('CircularBrush', 'FILL_INSIDE_CIRCLE'),
        brush('CircularEraser', 'ERASE_INSIDE_CIRCLE'),
        brush('SphereBrush', 'FILL_INSIDE_SPHERE'),
        brush('SphereEraser', 'ERASE_INSIDE_SPHERE'),
        brush('ThresholdCircularBrush', 'THRESHOLD_INSIDE_CIRCLE'),
        brush('ThresholdSphereBrush', 'THRESHOLD_INSIDE_SPHERE'),
        { toolName: toolNames.CircleScissors },
        { toolName: toolNames.RectangleScissors },
        { toolName: toolNames.SphereScissors },
        { toolName: 'ProbeMONAILabel' },
      ],
      disabled: [{ toolName: toolNames.ReferenceLines }],
    });
    toolGroupService.createToolGroupAndAddTools('default', tools());
    const mpr = tools();
    mpr.disabled.push({ toolName: toolNames.Crosshairs, configuration: { viewportIndicators: false, autoPan: { enabled: false } } });
    toolGroupService.createToolGroupAndAddTools('mpr', mpr);
  }

  const tool = (id, icon, label, toolGroupIds) => ({
    id,
    uiType: 'ohif.radioGroup',
    props: {
      icon,
      label,
      commands: { commandName: 'setToolActiveToolbar', commandOptions: { toolGroupIds: toolGroupIds || ['default', 'mpr'] } },
      evaluate: 'evaluate.cornerstoneTool',
    },
  });
  const radius = (id, toolNames) => ({
    name: 'Radius (mm)',
    id,
    type: 'range',
    min: 0.5,
    max: 99.5,
    step: 0.5,
    value: 10,
    commands: { commandName: 'setBrushSize', commandOptions: { toolNames } },
  });
  const shape = (id, circle, sphere) => ({
    name: 'Shape',
    type: 'radio',
    id,
    value: circle,
    values: [
      { value: circle, label: 'Circle' },
      { value: sphere, label: 'Sphere' },
    ],
    commands: 'setToolActiveToolbar',
  });
  const segmentationTool = (id, icon, label, toolNames, options) => ({
    id,
    icon,
    label,
    evaluate: { name: 'evaluate.cornerstone.segmentation', toolNames, disabledText: 'Run a prompt first: it creates the labelmap.' },
    options,
  });
  const BUTTONS = [
    tool('WindowLevel', 'tool-window-level', 'Window Level'),
    tool('Pan', 'tool-move', 'Pan'),
    tool('Zoom', 'tool-zoom', 'Zoom'),
    tool('Crosshairs', 'tool-crosshair', 'Crosshairs', ['mpr']),
    {
      id: 'Layout',
      uiType: 'ohif.layoutSelector',
      props: { rows: 3, columns: 4, evaluate: 'evaluate.action', commands: 'setViewportGridLayout' },
    },
    {
      id: 'BrushTools',
      uiType: 'ohif.buttonGroup',
      props: {
        groupId: 'BrushTools',
        items: [
          segmentationTool('Brush', 'icon-tool-brush', 'Brush', ['CircularBrush', 'SphereBrush'], [
            radius('brush-radius', ['CircularBrush', 'SphereBrush']),
            shape('brush-mode', 'CircularBrush', 'SphereBrush'),
          ]),
          segmentationTool('Eraser', 'icon-tool-eraser', 'Eraser', ['CircularEraser', 'SphereEraser'], [
            radius('eraser-radius', ['CircularEraser', 'SphereEraser']),
            shape('eraser-mode', 'CircularEraser', 'SphereEraser'),
          ]),
          segmentationTool('Threshold', 'icon-tool-threshold', 'Threshold brush', ['ThresholdCircularBrush', 'ThresholdSphereBrush'], [
            radius('threshold-radius', ['ThresholdCircularBrush', 'ThresholdSphereBrush']),
            shape('threshold-shape', 'ThresholdCircularBrush', 'ThresholdSphereBrush'),
            {
              name: 'HU range',
              type: 'double-range',
              id: 'threshold-range',
              min: -1000,
              max: 1000,
              step: 1,
              value: [-100, 300],
              commands: { commandName: 'setThresholdRange', commandOptions: { toolNames: ['ThresholdCircularBrush', 'ThresholdSphereBrush'] } },
            },
          ]),
        ],
      },
    },
    {
      id: 'Shapes',
      uiType: 'ohif.radioGroup',
      props: {
        label: 'Scissors',
        icon: 'icon-tool-shape',
        evaluate: { name: 'evaluate.cornerstone.segmentation', toolNames: ['CircleScissor', 'SphereScissor', 'RectangleScissor'] },
        options: [
          {
            name: 'Shape',
            type: 'radio',
            value: 'CircleScissor',
            id: 'shape-mode',
            values: [
              { value: 'CircleScissor', label: 'Circle' },
              { value: 'SphereScissor', label: 'Sphere' },
              { value: 'RectangleScissor', label: 'Rectangle' },
            ],
            commands: 'setToolActiveToolbar',
          },
        ],
      },
    },
  ];

  // ------------------------------------------------------------------ extension and mode
  const extension = {
    id: EXTENSION,
    getPanelModule: () => [
      // the workspace, or why it cannot run on this OHIF (ohif-shim.js)
      { name: 'workspace', iconName: 'tab-segmentation', iconLabel: 'SegVol', label: 'SegVol', component: ohif.guard(WorkspacePanel) },
    ],
  };

  // OHIF loads a mode's dependencies by name; ours is registered at start (config.extensions)
  const dependencies = ohif.EXTENSIONS;
  const { IDS } = ohif;

  function modeFactory() {
    return {
      id: ROUTE,
      routeName: ROUTE,
      displayName: 'SegVol annotation',
      onModeEnter: ({ servicesManager, extensionManager }) => {
        ohif.enterMode(servicesManager, extensionManager); // says loudly what does not fit this OHIF
        const { measurementService, toolbarService, toolGroupService } = servicesManager.services;
        measurementService.clearMeasurements();
        try {
          initToolGroups(extensionManager, toolGroupService);
        } catch (e) {
          ohif.fail(`the editing tools were not set up: ${e.message}`);
        }
        toolbarService.addButtons(BUTTONS);
        toolbarService.createButtonSection('primary', ['WindowLevel', 'Pan', 'Zoom', 'Layout', 'Crosshairs']);
        toolbarService.createButtonSection('segmentationToolbox', ['BrushTools', 'Shapes']);
        ohif.hideStockActiveLearning();
        pointPanelAtUs();
        watchEdits();
        workspace.upkeep = setInterval(upkeep, 700);
      },
      onModeExit: ({ servicesManager }) => {
        clearInterval(workspace.upkeep);
        ohif.exitMode(servicesManager);
      },
      validationTags: { study: [], series: [] },
      isValidMode: ({ modalities }) => ({
        valid: modalities.split('\\').includes('CT'),
        description: 'SegVol segments CT',
      }),
      routes: [
        {
          path: ROUTE,
          layoutTemplate: () => ({
            id: IDS.layout,
            props: {
              leftPanels: [`${EXTENSION}.panelModule.workspace`, IDS.seriesList],
              rightPanels: [IDS.monaiLabelPanel, IDS.segmentationPanel],
              leftPanelClosed: false,
              rightPanelClosed: false,
              viewports: [{ namespace: IDS.viewport, displaySetsToDisplay: [IDS.stack] }],
            },
          }),
        },
      ],
      extensions: dependencies,
      hangingProtocol: 'mpr',
      sopClassHandlers: [IDS.stack],
      hotkeys: [],
    };
  }

  config.extensions = [...(config.extensions || []), extension];
  config.modes = [...(config.modes || []), { id: ROUTE, modeFactory, extensionDependencies: dependencies }];
})();
