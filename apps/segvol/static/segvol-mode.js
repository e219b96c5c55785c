// segvol-label: the SegVol mode for OHIF 3.10 as bundled in MONAI Label 0.8.5, added through
// app-config.js (no OHIF fork, no rebuild). Route /ohif/segvol?StudyInstanceUIDs=...
//
// Left: the SegVol workspace (annotator, next image, save, undo, the segment painted, the box
// prompt, model and round status, the image's saved labels): its logic here, its panel in
// workspace-panel.js. Right: MONAI Label's panel (class and point prompts) and OHIF's segmentation
// panel with its editing tools (brush, eraser, threshold brush, scissors) on the labelmap that
// SegVol fills. Why these pieces, and the OHIF 3.10 bugs they avoid: docs/ohif.md.
//
// Sent after ohif-shim.js (what depends on the OHIF build: window.segvolOhif), segments.js (the
// catalogue, the overlap rule), box-prompt.js and workspace-panel.js.
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
  const { currentSeries, labelmapData, segmentLabel, setLabelmap } = ohif;
  const { catalog, segments, writeNamed } = window.segvolSegments;
  const { box, run: runBox } = window.segvolBox;
  const review = window.segvolReview; // review-panel.js: the reviewer's and the returned labels' part
  const AUTOSAVE_MS = 2000; // unsaved work reaches the server this long after the last change

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
    // ``removed``: segments ({index, label}) deleted by this step, added back by its undo
    record(data, removed = []) {
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
      this.steps.push({ idx: Uint32Array.from(idx), before: Uint8Array.from(before), removed });
      if (this.steps.length > MAX_UNDO) this.steps.shift();
      return true;
    },
    undo() {
      const step = this.steps.pop();
      if (!step) return false;
      for (const seg of step.removed) ohif.addSegment(seg.index, seg.label, catalog.colour(seg.label));
      const data = labelmapData();
      for (let n = 0; n < step.idx.length; n++) {
        data[step.idx[n]] = step.before[n];
        this.baseline[step.idx[n]] = step.before[n];
      }
      expected.write = true;
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
  class ServerError extends Error {
    constructor(status, detail) {
      super(`${status}: ${typeof detail === 'string' ? detail : (detail && detail.message) || JSON.stringify(detail)}`);
      this.status = status;
      this.detail = detail;
    }
  }

  async function api(path, options = {}) {
    const r = await fetch(path, options);
    let body = null;
    const type = r.headers.get('content-type') || '';
    if (type.includes('json')) body = await r.json();
    else if (type.includes('octet-stream')) body = await r.arrayBuffer();
    else body = await r.text();
    if (!r.ok) throw new ServerError(r.status, body && body.detail ? body.detail : r.statusText);
    return { body, headers: r.headers };
  }

  // the labelmap's raw bytes, gzip-compressed (a labelmap is mostly zeros: an autosave stays small)
  async function gzip(data) {
    const stream = new Blob([data]).stream().pipeThrough(new CompressionStream('gzip'));
    return new Blob([await new Response(stream).arrayBuffer()]);
  }

  // value -> segment name for every value in ``data`` (a value with no segment row is an error)
  function namesOf(data) {
    const present = new Set();
    for (let i = 0; i < data.length; i++) if (data[i]) present.add(data[i]);
    const values = [...present].sort((a, b) => a - b);
    const unnamed = values.filter(v => !segmentLabel(v));
    return { values, unnamed, info: values.map(v => ({ value: v, name: segmentLabel(v) })) };
  }

  const when = iso => (iso ? iso.slice(11, 16) : '?');

  // ------------------------------------------------------------------ the workspace
  const expected = { write: false }; // the next labelmap change is a result or an opened label, not a stroke

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
      active: null,
      conflict: null,
      box: box.snapshot(),
      search: '',
      review: review ? review.initial() : {},
    },
    labels: {}, // /info label index -> name
    image: null, // the series whose labelmap the page holds, once restored or opened
    basedOn: null, // the version of the final label the work started from (0: none)
    reviewOf: null, // the label version this reviewer's save corrects (review-panel.js), else null
    api,
    set(patch) {
      Object.assign(this.state, patch);
      this.listeners.forEach(f => f({ ...this.state }));
    },
    say(message, ok = true) {
      this.set({ message, ok });
    },
    annotator,
    // a new name: kept in this browser; the image's work is looked up again under it (unless unsaved work is in view)
    rename(name) {
      const changed = name && name !== annotator();
      if (name) localStorage.setItem(ANNOTATOR_KEY, name);
      if (changed && !this.dirty()) this.image = null;
      this.refresh();
      if (changed && review) review.load();
    },
    setStrategy(strategy) {
      localStorage.setItem(STRATEGY_KEY, strategy);
      this.set({ strategy });
    },
    dirty() {
      const data = labelmapData();
      return !!data && history.dirty(data);
    },

    async info() {
      if (Object.keys(this.labels).length) return;
      const { body } = await api('/info/');
      const model = body.models && body.models.segvol;
      for (const [name, idx] of Object.entries((model && model.labels) || {})) this.labels[idx] = name;
      this.set({ strategies: Object.keys(body.strategies || {}) });
      await catalog.load();
    },

    async refresh() {
      const where = currentSeries();
      const q = new URLSearchParams({ client_id: annotator() });
      if (where) q.set('image', where.series);
      if (where && where.series !== this.historyOf) this.loadHistory(); // a new image in view
      try {
        const { body } = await api('/segvol/status?' + q);
        this.follow(this.state.status, body, where);
        this.set({ status: body });
      } catch (e) {
        this.set({ status: { error: String(e.message || e) } });
      }
      if (review) review.poll();
    },

    // What changed since the last look: a colleague's new label, a lease that ended, a round over.
    follow(before, now, where) {
      if (!before || !where || before.error) return;
      const newest = now.newest_label;
      const seen = before.newest_label;
      if (newest && (!seen || seen.version !== newest.version)) {
        this.loadHistory();
        if (newest.client !== annotator() && newest.version !== this.basedOn) {
          this.say(`${newest.client} saved a label of this image at ${when(newest.time)} (version ${newest.version}). ` +
            'Your work is kept; when you save you can open theirs, take segments from both, or save yours as a new version.', false);
        }
      }
      const held = l => l && l.image === where.series;
      const changed = newest && (!seen || seen.version !== newest.version);
      if (held(before.lease) && !held(now.lease) && !(changed && newest.client === annotator())) {
        const by = changed ? ` because ${newest.client} saved its final label at ${when(newest.time)}` : ' (it ran out)';
        this.say(`Your lease on this image ended${by}: another annotator may be handed it.`, false);
      }
      const running = s => s.round && s.round.state === 'running';
      if (running(before) && !running(now) && /round started/.test(this.state.message)) {
        this.say('The fine-tune round ended: its result shows below.');
      }
    },

    async loadHistory() {
      const where = currentSeries();
      if (!where) return;
      const fresh = this.historyOf !== where.series;
      this.historyOf = where.series;
      try {
        const { body } = await api('/segvol/labels?' + new URLSearchParams({ image: where.series, client_id: annotator() }));
        this.set({ history: body });
      } catch (e) {
        this.set({ history: [] });
      }
      if (review && fresh) review.onImage(where.series);
    },

    // A result of MONAI Label's panel: the class just prompted becomes the segment the tools paint.
    onResult(params) {
      const prompted = params.label_prompt && params.label_prompt.length ? params.label_prompt[0] : null;
      expected.write = true;
      const name = this.labels[prompted];
      if (name) segments.chosen = true;
      setTimeout(() => {
        if (name && segments.indexOf(name)) segments.choose(name);
        this.refresh();
      }, 300);
    },

    // ---------------------------------------------------------------- on arriving at an image
    // Once the labelmap exists: this annotator's autosaved work, else the image's final label.
    async arrive() {
      const where = currentSeries();
      if (!where || !labelmapData() || this.image === where.series || this.arriving) return;
      this.arriving = true;
      try {
        await this.info();
        this.image = where.series;
        segments.reset();
        this.reviewOf = null;
        const reviewing = review ? review.context(where.series) : null; // a label picked in the To review list
        if (reviewing && reviewing.fresh) return await review.open(reviewing.item);
        const q = new URLSearchParams({ image: where.series, client_id: annotator() });
        const r = await fetch('/segvol/autosave?' + q);
        if (r.ok) {
          const meta = JSON.parse(r.headers.get('X-SegVol-Autosave') || '{}');
          this.show(new Uint8Array(await r.arrayBuffer()), JSON.parse(r.headers.get('X-SegVol-Labels') || '{}'));
          this.basedOn = meta.based_on ?? null;
          history.saved = null;
          if (reviewing) review.resume(reviewing.item);
          this.say(`Restored your unsaved work from ${when(meta.time)} (autosaved on the server; it becomes a label when you save).`);
          return;
        }
        if (reviewing) return await review.open(reviewing.item);
        const { body } = await api('/segvol/labels?' + new URLSearchParams({ image: where.series, client_id: annotator() }));
        this.set({ history: body });
        const final = body.find(e => !e.draft && e.version);
        this.basedOn = final ? final.version : 0;
        if (final) await this.open(final, true);
      } catch (e) {
        this.say(`Could not restore this image's work: ${e.message}`, false);
      } finally {
        this.arriving = false;
      }
    },

    // A label shown as the saved state of the work (no unsaved edits), its version the one the work is based on.
    showLabel(raw, names, basedOn) {
      const shown = this.show(raw, names);
      history.saved = new Uint8Array(labelmapData());
      if (basedOn != null) this.basedOn = basedOn;
      return shown;
    },

    // The viewer to ``series`` of ``study`` (a page load); false when the annotator stays.
    go(study, series) {
      const edited = labelmapData();
      if (edited && history.dirty(edited)) {
        if (!window.confirm('This image has edits that are not saved (they are autosaved: you will find them when you come back). Leave it anyway?')) return false;
        this.autosave();
      }
      const q = new URLSearchParams({ StudyInstanceUIDs: study, initialSeriesInstanceUID: series });
      leaving = true;
      location.assign(`${config.routerBasename.replace(/\/$/, '')}/${ROUTE}?${q}`);
      return true;
    },

    // ``raw`` voxels (values named by ``names``) shown as the labelmap; the first segment active
    show(raw, names) {
      const data = labelmapData();
      if (raw.length !== data.length) throw new Error(`the label has ${raw.length} voxels, the image ${data.length}`);
      const shown = writeNamed(data, raw, names);
      expected.write = true;
      setLabelmap(data);
      if (shown.length) segments.choose(shown[0]);
      this.set({ active: segments.active() });
      return shown;
    },

    // ---------------------------------------------------------------- autosave
    scheduleAutosave() {
      clearTimeout(this.autosaveTimer);
      this.autosaveTimer = setTimeout(() => this.autosave(), AUTOSAVE_MS);
    },

    async autosave() {
      const data = labelmapData();
      const where = currentSeries();
      if (!data || !where || where.series !== this.image || !history.dirty(data)) return;
      if (this.autosaving) return this.scheduleAutosave();
      const { unnamed, info } = namesOf(data);
      if (unnamed.length) return;
      this.autosaving = true;
      try {
        const form = new FormData();
        const shape = ohif.grid().dimensions;
        const params = { client_id: annotator(), shape, label_info: info, based_on: this.basedOn, encoding: 'gzip' };
        form.append('params', JSON.stringify(params));
        form.append('label', await gzip(data), 'label.bin.gz');
        const { body } = await api('/segvol/autosave?image=' + encodeURIComponent(where.series), { method: 'PUT', body: form });
        this.set({ autosaved: body.time });
      } catch (e) {
        this.say(`Your work was not autosaved: ${e.message}`, false);
      } finally {
        this.autosaving = false;
      }
    },

    // ---------------------------------------------------------------- next image, save, open
    async nextImage() {
      const edited = labelmapData();
      if (edited && history.dirty(edited)) {
        if (!window.confirm('This image has edits that are not saved (they are autosaved: you will find them when you come back). Leave it anyway?')) return;
      }
      this.set({ busy: 'next' });
      this.say(`Asking the server for the next image (${this.state.strategy})...`);
      try {
        await this.autosave();
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
        const notes = [body.note];
        if (body.returned) notes.push(`${body.returned.reviewer || 'a reviewer'} returned your label of this image: ${body.returned.comment || ''}`);
        if (body.double_read) notes.push("this image is double read: another annotator labels it too, and neither sees the other's label until both are saved");
        sessionStorage.setItem('segvol-label.note', notes.filter(Boolean).join(' · '));
        if (review) review.handed(body);
        const q = new URLSearchParams({
          StudyInstanceUIDs: body.StudyInstanceUID,
          initialSeriesInstanceUID: body.id,
        });
        leaving = true;
        location.assign(`${config.routerBasename.replace(/\/$/, '')}/${ROUTE}?${q}`);
      } catch (e) {
        this.say(`Next image failed: ${e.message}`, false);
      } finally {
        this.set({ busy: '' });
      }
    },

    async save(force = false) {
      const data = labelmapData();
      const where = currentSeries();
      if (!data || !where) return this.say('No segmentation yet: run a prompt first.', false);
      const { values, unnamed, info } = namesOf(data);
      if (!values.length) return this.say('The segmentation is empty: nothing to save.', false);
      if (unnamed.length) return this.say(`Voxels of value ${unnamed.join(', ')} belong to no segment: undo the deletion or erase them.`, false);
      const form = new FormData();
      const params = { label_info: info.map(x => ({ name: x.name })), client_id: annotator(), based_on: this.basedOn ?? 0, force };
      const reviewOf = this.reviewOf && this.image === where.series ? this.reviewOf : null;
      if (reviewOf) params.review_of = reviewOf; // a reviewer's correction: approved as it is saved
      form.append('params', JSON.stringify(params));
      form.append('label', new Blob([new Uint8Array(data.buffer, data.byteOffset, data.byteLength)]), 'label.bin');
      this.set({ busy: 'save', conflict: null });
      this.say('Saving...');
      const t0 = performance.now();
      try {
        clearTimeout(this.autosaveTimer);
        const { body } = await api(`/datastore/label?image=${encodeURIComponent(where.series)}&tag=final`, {
          method: 'PUT',
          body: form,
        });
        history.saved = new Uint8Array(data);
        this.basedOn = body.version ?? this.basedOn;
        const kinds = (body.segments || []).map(s => {
          const edit = s.type === 'SEMIAUTOMATIC' ? ` +${s.added}/−${s.removed} voxels` : '';
          return `${s.name}: ${s.type}${edit}`;
        });
        const seconds = ((performance.now() - t0) / 1000).toFixed(1);
        this.say(`Saved to the archive in ${seconds} s as ${body.client || annotator()}, version ${body.version} (${kinds.join('; ')}).`);
        window.segvolLastSave = { seconds: Number(seconds), response: body };
        if (review && reviewOf) review.corrected(body);
        else if (review) review.saved(where.series);
        this.loadHistory();
        this.refresh();
      } catch (e) {
        if (e.status === 409 && e.detail && e.detail.newest) {
          this.set({ conflict: e.detail });
          this.say(`Not saved yet: ${e.detail.message}.`, false);
        } else if (review && reviewOf && [403, 404, 409].includes(e.status)) this.say(review.refusal('correct', e), false);
        else this.say(`Not saved: ${e.message}`, false);
      } finally {
        this.set({ busy: '' });
      }
    },

    // The conflict dialog's answers: open theirs, take segments from both, or save anyway.
    async resolve(choice) {
      const conflict = this.state.conflict;
      if (!conflict) return;
      this.set({ conflict: null });
      const theirs = { ...conflict.newest, seg_series: conflict.newest.seg_series };
      if (choice === 'force') return this.save(true);
      if (choice === 'open') return this.open(theirs);
      if (choice === 'merge') return this.merge(theirs);
    },

    // Their label's segments that this work lacks, added where this work leaves voxels free.
    async merge(entry) {
      this.set({ busy: 'open' });
      try {
        const { raw, names } = await this.fetchLabel(entry);
        const data = labelmapData();
        const mine = new Set(namesOf(data).info.map(x => x.name)); // the segments this work holds voxels of
        const active = ohif.activeSegment();
        const taken = [];
        for (const [value, name] of Object.entries(names)) {
          if (mine.has(name)) continue;
          const index = segments.ensure(name);
          const v = Number(value);
          for (let i = 0; i < raw.length; i++) if (raw[i] === v && !data[i]) data[i] = index;
          taken.push(name);
        }
        if (active) ohif.setActiveSegment(active);
        expected.write = true;
        setLabelmap(data);
        this.basedOn = entry.version;
        this.say(`Took ${taken.length ? taken.join(', ') : 'nothing (you have every segment they have)'} from ${entry.client}'s version ${entry.version}; yours kept the rest. Save to store both.`);
      } catch (e) {
        this.say(`Could not take their segments: ${e.message}`, false);
      } finally {
        this.set({ busy: '' });
      }
    },

    async fetchLabel(entry) {
      const q = new URLSearchParams({ image: currentSeries().series, client_id: annotator() });
      if (entry && entry.seg_series) q.set('seg', entry.seg_series);
      const { body, headers } = await api('/segvol/labels/voxels?' + q);
      return { raw: new Uint8Array(body), names: JSON.parse(headers.get('X-SegVol-Labels') || '{}') };
    },

    async open(entry, onArrival = false) {
      const where = currentSeries();
      if (!where || !labelmapData()) return this.say('Connect the MONAI Label panel first (it creates the labelmap).', false);
      this.set({ busy: 'open' });
      try {
        const { raw, names } = await this.fetchLabel(entry);
        const shown = this.show(raw, names);
        history.saved = new Uint8Array(labelmapData());
        if (entry && entry.version && !entry.draft) this.basedOn = entry.version;
        const who = entry ? entry.client || entry.creator || 'unknown' : 'final label';
        const what = entry && entry.draft ? 'draft (not a final label until you save it)' : onArrival ? "image's final label" : 'label';
        this.say(
          `${onArrival ? 'Showing' : 'Opened'} the ${what} saved by ${who}${entry && entry.time ? ' at ' + entry.time : ''}` +
            `${entry && entry.version ? ' (version ' + entry.version + ')' : ''}: edit it and save a new version.` +
            (shown.length ? ` Painting: ${shown[0]}.` : '')
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

    // ---------------------------------------------------------------- segments and the box
    choose(name) {
      try {
        segments.choose(name);
        this.set({ active: segments.active(), search: '' });
      } catch (e) {
        this.say(e.message, false);
      }
    },

    async runBox() {
      const where = currentSeries();
      if (!where || !labelmapData()) return this.say('Connect the MONAI Label panel first (it creates the labelmap).', false);
      this.set({ busy: 'box' });
      this.say('Running the box prompt...');
      const t0 = performance.now();
      try {
        const { params, changed, segment, data } = await runBox(where.series, annotator());
        expected.write = true;
        setLabelmap(data);
        window.segvolLastBox = params;
        const seconds = ((performance.now() - t0) / 1000).toFixed(1);
        this.say(`Box prompt for ${segment} in ${seconds} s: ${changed} voxels changed.`);
        this.refresh();
      } catch (e) {
        this.say(`The box prompt did not run: ${e.message}`, false);
      } finally {
        this.set({ busy: '' });
      }
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
  box.listeners.add(snapshot => workspace.set({ box: snapshot }));

  // ------------------------------------------------------------------ page upkeep
  // The labelmap on every viewport of the layout; MONAI Label's panel connected to this server;
  // the image's work restored; segments in the team's colours; a deleted segment's voxels cleared.
  function upkeep() {
    if (!onSegVolPage() || !ohif.services()) return;
    ohif.showLabelmapEverywhere();
    ohif.connectMonaiLabel(serverUrl());
    if (!labelmapData()) return;
    workspace.arrive();
    if (catalog.entries.length) segments.paint();
    clearDeleted();
    noticeChoice();
    const active = segments.active();
    const shown = workspace.state.active;
    if (!active !== !shown || (active && (active.index !== shown.index || active.chosen !== shown.chosen))) workspace.set({ active });
  }

  // A segment deleted in OHIF's list takes its voxels with it (undo brings both back).
  let known = {};
  function clearDeleted() {
    const now = ohif.segments();
    const removed = Object.keys(known).filter(i => !now[i]).map(i => ({ index: Number(i), label: known[i].label }));
    known = now;
    if (!removed.length) return;
    const data = labelmapData();
    const gone = new Set(removed.map(r => r.index));
    let cleared = 0;
    for (let i = 0; i < data.length; i++) {
      if (gone.has(data[i])) {
        data[i] = 0;
        cleared++;
      }
    }
    clearTimeout(settleTimer);
    expected.write = true;
    if (cleared) setLabelmap(data);
    if (history.record(data, removed)) workspace.set({ canUndo: true });
    else if (history.steps.length) history.steps[history.steps.length - 1].removed.push(...removed);
    expected.write = false;
    workspace.scheduleAutosave();
    workspace.say(`Deleted ${removed.map(r => r.label).join(', ')} and its ${cleared} voxels (Undo brings them back).`);
  }

  // The annotator picked a segment in OHIF's list: that is a choice.
  let lastActive = null;
  function noticeChoice() {
    const index = ohif.activeSegment();
    const clicked = Date.now() - lastPointer < 1500;
    if (index !== lastActive && lastActive !== null && clicked && !workspace.arriving) segments.chosen = true;
    lastActive = index;
  }

  // MONAI Label's panel talks to the server that serves this page, from its very first call.
  const serverUrl = () => location.origin + '/';
  const pointPanelAtUs = () => ohif.pointMonaiLabelAt(serverUrl());
  pointPanelAtUs();

  // A change is recorded once it settles: not while the mouse is down (a stroke in progress).
  // A stroke made before anyone chose the segment it paints is taken back: never a default.
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
      const ours = expected.write;
      expected.write = false;
      if (!history.record(data)) return;
      const step = history.steps[history.steps.length - 1];
      const painted = step.idx.some(i => data[i] !== 0);
      if (!ours && painted && !segments.chosen && workspace.image) {
        history.undo();
        workspace.say('Nothing painted: choose the segment to paint first (OHIF\'s segment list, or Find a structure in this panel).', false);
      } else workspace.scheduleAutosave();
      workspace.set({ canUndo: history.steps.length > 0 });
    }, 250);
  }
  const watchEdits = () => ohif.onLabelmapModified(settle);
  let lastPointer = 0;
  document.addEventListener(
    'mousedown',
    () => {
      mouseDown = true;
      lastPointer = Date.now();
    },
    true
  );
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

  // Leaving the page with unsaved work: the browser asks (the work is autosaved in any case).
  let leaving = false;
  window.addEventListener('beforeunload', e => {
    const data = onSegVolPage() ? labelmapData() : null;
    if (leaving || !data || !history.dirty(data)) return;
    workspace.autosave();
    e.preventDefault();
    e.returnValue = '';
  });

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
      { name: 'workspace', iconName: 'tab-segmentation', iconLabel: 'SegVol', label: 'SegVol', component: ohif.guard(window.segvolPanel.WorkspacePanel) },
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
        workspace.segSeries = ohif.hideSegSeries();
        workspace.upkeep = setInterval(upkeep, 700);
      },
      onModeExit: ({ servicesManager }) => {
        clearInterval(workspace.upkeep);
        workspace.segSeries?.();
        workspace.autosave(); // OHIF's Back to the study list: the page stays, the work reaches the server
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
