// segvol-label: the SegVol mode's review workspace (sent after workspace-panel.js, before
// segvol-mode.js). Who the annotator is to the server (GET /segvol/whoami); for a reviewer the
// To review list, the label under review with its provenance, Approve / Return with a comment /
// Correct, double readings side by side with their agreement; for every annotator the labels
// returned to them with the reviewer's comment; for reviewers and admins the team's figures.
// The REST contract: docs/review.md. Its logic works through window.segvolWorkspace
// (segvol-mode.js: api(), annotator(), go(), showLabel(), fetchLabel(), say()); its sections are
// drawn by workspace-panel.js with the bundle's React (no build step).
(function () {
  'use strict';
  const ohif = window.segvolOhif;
  if (!ohif) return;
  const REVIEWING_KEY = 'segvol-label.reviewing'; // the review item the page works on (this tab)
  const RETURNED_KEY = 'segvol-label.returned'; // Next image handed back a returned label (this tab)
  const LISTS_EVERY_MS = 10000; // the lists are asked again this often (and after every action)
  const ws = () => window.segvolWorkspace;
  const when = iso => (iso ? iso.slice(11, 16) : '?');
  const short = id => (id ? '…' + String(id).slice(-8) : '?');
  const fixed = (x, n) => (typeof x === 'number' && Number.isFinite(x) ? x.toFixed(n) : '–');

  function load(key) {
    try {
      return JSON.parse(sessionStorage.getItem(key) || 'null');
    } catch (e) {
      return null;
    }
  }
  const keep = (key, value) => (value == null ? sessionStorage.removeItem(key) : sessionStorage.setItem(key, JSON.stringify(value)));

  // how a segment was made: AUTOMATIC, SEMIAUTOMATIC +a/−r, MANUAL
  function origin(s) {
    const changes = s.changes || (s.added != null || s.removed != null ? { added: s.added || 0, removed: s.removed || 0 } : null);
    const edit = s.type === 'SEMIAUTOMATIC' || (s.changes && s.type !== 'MANUAL') ? ` +${changes ? changes.added : '?'}/−${changes ? changes.removed : '?'}` : '';
    return `${s.name} ${s.type || '?'}${edit}`;
  }
  function waiting(minutes) {
    if (typeof minutes !== 'number') return '';
    if (minutes < 1) return 'under a minute';
    if (minutes < 90) return `${Math.round(minutes)} min`;
    const h = Math.floor(minutes / 60);
    return h < 48 ? `${h} h ${Math.round(minutes - 60 * h)} min` : `${Math.round(h / 24)} days`;
  }
  const models = item => [...new Set([item.model_version, ...(item.segments || []).map(s => s.model_version)].filter(Boolean))];

  const review = {
    initial: () => ({
      who: null, // GET /segvol/whoami's answer
      error: '',
      queue: [],
      filters: { annotator: '', category: '' },
      seenAnnotators: [],
      seenCategories: [],
      returned: [],
      team: null,
      current: null, // the queue item under review on this page
      shown: 0, // which reading of a double-read item is in the labelmap
      comment: '', // Return: the comment for the whole label
      perSegment: '', // Return: "segment: comment" per line
      note: null, // a reviewer's comment on this annotator's label of the image in view
      imageState: null, // GET /segvol/review/image for the image in view
    }),
    get state() {
      return ws().state.review;
    },
    set(patch) {
      ws().set({ review: { ...ws().state.review, ...patch } });
    },
    readings: {}, // version -> {raw, names} of the item under review
    lastLists: 0,

    // ---------------------------------------------------------------- who, and the lists
    async load() {
      const w = ws();
      try {
        const { body } = await w.api('/segvol/whoami?' + new URLSearchParams({ client_id: w.annotator() }));
        this.set({ who: body, error: '' });
      } catch (e) {
        this.set({ who: null, error: `who you are to the server is not known: ${e.message}` });
        return;
      }
      await this.lists();
    },

    poll() {
      if (Date.now() - this.lastLists < LISTS_EVERY_MS) return;
      if (this.state.who) return this.lists();
      this.lastLists = Date.now(); // whoami failed (the server was away): asked again
      this.load();
    },

    async lists() {
      const w = ws();
      const who = this.state.who;
      if (!who) return;
      this.lastLists = Date.now();
      const me = w.annotator();
      const jobs = [];
      if (who.reviewer) {
        const q = new URLSearchParams({ client_id: me });
        const { annotator, category } = this.state.filters;
        if (annotator) q.set('annotator', annotator);
        if (category) q.set('category', category);
        jobs.push(
          w.api('/segvol/review/queue?' + q).then(({ body }) => {
            const items = body.items || [];
            const add = (list, names) => [...new Set([...list, ...names.filter(Boolean)])].sort();
            this.set({
              queue: items,
              seenAnnotators: add(this.state.seenAnnotators, items.flatMap(i => [i.annotator, ...((i.double_read && i.double_read.annotators) || [])])),
              seenCategories: add(this.state.seenCategories, items.flatMap(i => (i.segments || []).map(s => s.name))),
            });
          })
        );
      }
      jobs.push(w.api('/segvol/review/returned?' + new URLSearchParams({ client_id: me })).then(({ body }) => this.set({ returned: body.items || [] })));
      if (who.reviewer || who.admin) {
        jobs.push(
          w.api('/segvol/team?' + new URLSearchParams({ client_id: me, format: 'json' })).then(({ body }) => {
            this.set({ team: body, seenAnnotators: [...new Set([...this.state.seenAnnotators, ...(body.annotators || []).map(a => a.client)])].sort() });
          })
        );
      }
      const where = ohif.services() && ohif.currentSeries();
      if (where) jobs.push(this.onImage(where.series)); // a comment on my label of this image, as it comes
      const failed = (await Promise.allSettled(jobs)).filter(r => r.status === 'rejected');
      this.set({ error: failed.length ? `the review lists did not load: ${failed[0].reason.message}` : '' });
    },

    setFilter(key, value) {
      this.set({ filters: { ...this.state.filters, [key]: value } });
      this.lists();
    },

    // The image in view: what the server says of its labels' reviews; a returned label of mine -> its comment.
    async onImage(series) {
      const w = ws();
      const me = w.annotator();
      let labels = [];
      try {
        const { body } = await w.api('/segvol/review/image?' + new URLSearchParams({ image: series, client_id: me }));
        this.set({ imageState: body });
        labels = body.labels || [];
      } catch (e) {
        this.set({ imageState: null });
      }
      // per-segment comments: "segments_comments" in the contract, "segments" in the server's rows
      const perSegment = l => l.segments_comments || (l.segments && !Array.isArray(l.segments) ? l.segments : {});
      const mine = labels.filter(l => l.annotator === me && (l.state === 'returned' || l.state === 'resubmitted') && (l.comment || Object.keys(perSegment(l)).length));
      const newest = mine.sort((a, b) => (b.version || 0) - (a.version || 0))[0];
      const handed = load(RETURNED_KEY);
      if (newest) {
        this.set({ note: { version: newest.version, reviewer: newest.reviewer, comment: newest.comment, segments: perSegment(newest), time: newest.time, state: newest.state } });
      } else if (handed && handed.image === series) {
        this.set({ note: { ...handed, state: 'returned' } });
      } else this.set({ note: null });
    },

    // ---------------------------------------------------------------- opening an item
    // A row of the list: its image opened (the viewer goes to its series), its label shown.
    async pick(item) {
      const w = ws();
      const where = ohif.currentSeries();
      if (where && where.series === item.image && w.image === item.image) {
        if (w.dirty() && !window.confirm('This image has edits that are not saved (they are autosaved). Show the label under review instead?')) return;
        keep(REVIEWING_KEY, { image: item.image, item, fresh: false });
        return this.open(item);
      }
      const study = await this.studyOf(item.image);
      if (!study) return;
      keep(REVIEWING_KEY, { image: item.image, item, fresh: true });
      if (!w.go(study, item.image)) keep(REVIEWING_KEY, null);
    },

    // A label returned to me: its image opened as any image is (my autosaved work, else its final label).
    async visit(x) {
      const w = ws();
      const where = ohif.currentSeries();
      if (where && where.series === x.image) return this.onImage(x.image);
      const study = await this.studyOf(x.image);
      if (study) w.go(study, x.image);
    },

    async studyOf(image) {
      const w = ws();
      try {
        const { body } = await w.api('/datastore/image/info?' + new URLSearchParams({ image }));
        if (body.StudyInstanceUID) return body.StudyInstanceUID;
        w.say(`The server names no study for image ${short(image)}.`, false);
      } catch (e) {
        w.say(`Could not open image ${short(image)}: ${e.message}`, false);
      }
      return null;
    },

    // the item under review on this image (after a reload too), and whether it was just picked
    context(series) {
      const saved = load(REVIEWING_KEY);
      if (!saved || saved.image !== series) return null;
      if (saved.fresh) keep(REVIEWING_KEY, { ...saved, fresh: false });
      return saved;
    },

    // Resume a review after a reload: the item's context, the labelmap as it was (autosaved).
    resume(item) {
      this.set({ current: item, shown: 0 });
      ws().reviewOf = item.double_read ? item.double_read.versions[0] : item.version;
    },

    async open(item) {
      const w = ws();
      this.readings = {};
      this.set({ current: item, shown: 0, comment: '', perSegment: '' });
      try {
        if (item.double_read) {
          for (const version of item.double_read.versions) this.readings[version] = await this.reading(version);
          return this.show(0);
        }
        // its SEG in the archive, else (a folder datastore, or a SEG still on its way) the image's final label: that version
        const label = await w.fetchLabel(item.seg_series ? { seg_series: item.seg_series } : null);
        w.showLabel(label.raw, label.names, item.version);
        w.reviewOf = item.version;
        w.say(
          `Reviewing ${item.annotator}'s label (version ${item.version}, saved at ${when(item.time)}, waiting ${waiting(item.minutes_waiting)}): ` +
            `${(item.segments || []).map(origin).join('; ')}. Approve it, return it with a comment, or edit it and Correct.`
        );
      } catch (e) {
        w.say(`Could not open the label under review: ${e.message}`, false);
      }
    },

    async reading(version) {
      const w = ws();
      const { body, headers } = await w.api('/segvol/reading?' + new URLSearchParams({ version: String(version), client_id: w.annotator() }));
      return { raw: new Uint8Array(body), names: JSON.parse(headers.get('X-SegVol-Labels') || '{}'), meta: JSON.parse(headers.get('X-SegVol-Reading') || '{}') };
    },

    // A double-read item: reading n (0 = A, 1 = B) in the labelmap.
    async show(n) {
      const w = ws();
      const item = this.state.current;
      if (!item || !item.double_read) return;
      const dr = item.double_read;
      const version = dr.versions[n];
      try {
        if (!this.readings[version]) this.readings[version] = await this.reading(version);
        const { raw, names } = this.readings[version];
        w.showLabel(raw, names, Math.max(...dr.versions));
        w.reviewOf = version;
        this.set({ shown: n });
        w.say(
          `Showing reading ${'AB'[n]}: ${dr.annotators[n]}'s label (version ${version}). ` +
            'Switch between the readings, then adopt the one shown, or edit it and Correct: that becomes the final label.'
        );
      } catch (e) {
        w.say(`Could not show reading ${'AB'[n]}: ${e.message}`, false);
      }
    },

    // ---------------------------------------------------------------- the reviewer's decision
    async act(action) {
      const w = ws();
      const item = this.state.current;
      if (!item) return w.say('Open a label from the To review list first.', false);
      const dr = item.double_read;
      const version = dr ? dr.versions[this.state.shown] : item.version;
      const body = { client_id: w.annotator(), version, action: dr && action === 'approve' ? 'adopt' : action };
      if (action === 'return') {
        const comment = this.state.comment.trim();
        if (!comment) return w.say('Returning needs a comment: say what to fix.', false);
        body.comment = comment;
        const segments = {};
        for (const line of this.state.perSegment.split('\n')) {
          const at = line.indexOf(':');
          if (at > 0 && line.slice(at + 1).trim()) segments[line.slice(0, at).trim()] = line.slice(at + 1).trim();
        }
        if (Object.keys(segments).length) body.segments = segments;
      }
      w.set({ busy: 'review' });
      try {
        const { body: done } = await w.api('/segvol/review', {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify(body),
        });
        const whose = dr ? `${dr.annotators[this.state.shown]}'s reading ${'AB'[this.state.shown]}` : `${item.annotator}'s label`;
        const by = `(${done.reviewer || w.annotator()}, ${when(done.time)})`;
        let what = `Approved ${whose} (version ${version}): ${done.state} ${by}.`;
        if (action === 'return') what = `Returned ${whose} (version ${version}) with your comment: ${item.annotator} sees it and is handed the image first ${by}.`;
        else if (dr) what = `Adopted ${whose} (version ${version}): the image's final label is now version ${done.new_version}, approved; both readings ${done.state} ${by}.`;
        w.say(what);
        window.segvolLastReview = done;
        this.done();
      } catch (e) {
        w.say(this.refusal(action, e), false);
        if (e.status === 409 || e.status === 404) this.done(); // decided elsewhere, or gone: off the list
      } finally {
        w.set({ busy: '' });
      }
    },

    // 409/403/404 in words: who acted first, what state the label is in
    refusal(action, e) {
      const d = e.detail && typeof e.detail === 'object' ? e.detail : {};
      const verb = { approve: 'approved', return: 'returned', adopt: 'adopted', correct: 'saved' }[action] || 'done';
      let text = `Not ${verb} (${e.status || 'error'}): ${d.message || (typeof e.detail === 'string' ? e.detail : e.message)}`;
      if (d.by && d.state && !String(d.message || '').includes(d.by)) text += ` (${d.by} ${d.state} it first)`;
      return text;
    },

    // Correct: the reviewer's edits saved as the final label (Save label does the same while reviewing)
    correct() {
      const w = ws();
      if (!w.dirty()) return w.say('Correct: edit the label with the Segmentation tools first, then Correct (or Save label): your version becomes the final label, approved.', false);
      return w.save();
    },

    // The reviewer's own save with review_of: their corrected version, approved.
    corrected(saved) {
      const r = saved.review || {};
      const state = r.state || saved.review_state || saved.state || 'saved (the server named no review state)';
      const item = this.state.current;
      window.segvolLastReview = saved;
      ws().say(
        `Corrected ${item ? item.annotator + "'s label" : 'the label'} and saved it as version ${saved.version}: ${state}. ` +
          `${(saved.segments || []).map(origin).join('; ')}.`
      );
      this.done();
    },

    done() {
      keep(REVIEWING_KEY, null);
      this.readings = {};
      ws().reviewOf = null;
      this.set({ current: null, shown: 0, comment: '', perSegment: '' });
      this.lists();
    },

    // an annotator saved an image: a returned label of it is resubmitted
    saved(series) {
      const handed = load(RETURNED_KEY);
      if (handed && handed.image === series) keep(RETURNED_KEY, null);
      this.lists();
    },

    // Next image's answer: a returned label first (its comment kept for the page it opens)
    handed(answer) {
      keep(RETURNED_KEY, answer.returned ? { image: answer.id, ...answer.returned } : null);
    },

    // ---------------------------------------------------------------- drawing (workspace-panel.js)
    sections(h, state, button) {
      const r = state.review || {};
      const who = r.who;
      return [
        r.error ? h('div', { key: 'err', style: { color: '#fc6', fontSize: 11 } }, r.error) : null,
        who ? h('div', { key: 'who', id: 'segvol-roles', style: { color: '#9ab', fontSize: 11, marginBottom: 4 } }, `${who.client}: ${(who.roles || []).join(', ')}`) : null,
        r.note ? noteBox(h, r.note) : null,
        r.current ? underReview(h, r, button) : null,
        who && who.reviewer ? queueList(h, r) : null,
        returnedList(h, r),
        who && (who.reviewer || who.admin) ? teamFigures(h, r.team) : null,
      ];
    },
  };

  // the reviewer's comment on the annotator's label of this image
  function noteBox(h, note) {
    const segments = Object.entries(note.segments || {});
    return h(
      'div',
      { key: 'note', id: 'segvol-review-comment', style: { margin: '6px 0', padding: 6, borderRadius: 4, border: '2px solid #e80', background: '#3a2a10' } },
      h('div', { style: { fontWeight: 'bold' } }, note.state === 'resubmitted' ? `Returned by ${note.reviewer} (you resubmitted it)` : `Returned to you by ${note.reviewer || 'a reviewer'}${note.time ? ' at ' + when(note.time) : ''}`),
      h('div', { style: { whiteSpace: 'pre-wrap', margin: '3px 0' } }, note.comment || ''),
      segments.length ? h('ul', { style: { margin: 0, paddingLeft: 16 } }, segments.map(([name, text]) => h('li', { key: name }, h('b', null, name + ': '), text))) : null,
      note.state === 'resubmitted' ? null : h('div', { style: { color: '#fc6', fontSize: 11 } }, 'Fix it and Save label: the save resubmits it for review.')
    );
  }

  // A comment box of the review section, bound to ``key`` of the review's state.
  function commentBox(h, id, placeholder, key, r, marginTop) {
    return h('textarea', {
      id,
      placeholder,
      value: r[key],
      rows: 2,
      onChange: e => window.segvolReview.set({ [key]: e.target.value }),
      style: { width: '100%', color: 'black', padding: 3, boxSizing: 'border-box', marginTop },
    });
  }

  // the item being reviewed: its provenance, the readings and their agreement, the three actions
  function underReview(h, r, button) {
    const item = r.current;
    const dr = item.double_read;
    const review = window.segvolReview;
    const agreement = dr && dr.agreement ? dr.agreement : [];
    return h(
      'div',
      { key: 'current', id: 'segvol-review-current', style: { margin: '6px 0', padding: 6, borderRadius: 4, border: '1px solid #0a5d8a', background: '#102a3a' } },
      h('div', { style: { fontWeight: 'bold' } }, dr ? `Double read: ${dr.annotators.join(' and ')}` : `Under review: ${item.annotator}'s label`),
      h('div', { style: { color: '#9ab', fontSize: 11 } }, `version ${item.version} · saved ${item.time ? item.time.slice(0, 16).replace('T', ' ') : '?'} · model ${models(item).join(', ') || '?'}`),
      h('div', { style: { fontSize: 11, margin: '2px 0' } }, (item.segments || []).map(origin).join('; ')),
      item.resubmits ? h('div', { style: { fontSize: 11, color: '#fc6' } }, `Resubmitted after version ${item.resubmits.version} was returned: "${item.resubmits.comment}"`) : null,
      dr
        ? h(
            'div',
            { style: { margin: '4px 0' } },
            [0, 1].map(n =>
              h(
                'button',
                {
                  key: n,
                  id: `segvol-reading-${'ab'[n]}`,
                  onClick: () => review.show(n),
                  style: { padding: '3px 8px', marginRight: 6, borderRadius: 4, border: r.shown === n ? '2px solid #e80' : '1px solid #567', background: r.shown === n ? '#0a5d8a' : '#234', color: 'white', cursor: 'pointer' },
                },
                `${'AB'[n]}: ${dr.annotators[n]}${r.shown === n ? ' ✓' : ''}`
              )
            )
          )
        : null,
      dr
        ? h(
            'table',
            { id: 'segvol-agreement', style: { width: '100%', fontSize: 11, borderCollapse: 'collapse', margin: '4px 0' } },
            h('thead', null, h('tr', { style: { color: '#9ab' } }, ['segment', 'Dice', 'mean mm', '95% mm', 'mL A', 'mL B'].map(c => h('th', { key: c, style: { textAlign: c === 'segment' ? 'left' : 'right' } }, c)))),
            h(
              'tbody',
              null,
              agreement.map(a =>
                h(
                  'tr',
                  { key: a.name, 'data-segment': a.name },
                  h('td', null, a.name),
                  h('td', { style: { textAlign: 'right' } }, fixed(a.dice, 3)),
                  h('td', { style: { textAlign: 'right' } }, fixed(a.mean_mm, 2)),
                  h('td', { style: { textAlign: 'right' } }, fixed(a.p95_mm, 2)),
                  h('td', { style: { textAlign: 'right' } }, fixed((a.ml || [])[0], 1)),
                  h('td', { style: { textAlign: 'right' } }, fixed((a.ml || [])[1], 1))
                )
              )
            )
          )
        : null,
      h(
        'div',
        { style: { marginTop: 4 } },
        button('segvol-approve', dr ? `Adopt ${'AB'[r.shown]}` : 'Approve', () => review.act('approve')),
        dr ? null : button('segvol-return', 'Return', () => review.act('return'), !r.comment.trim()),
        button('segvol-correct', 'Correct', () => review.correct())
      ),
      dr ? null : commentBox(h, 'segvol-return-comment', 'Return: what to fix (required)', 'comment', r, 0),
      dr ? null : commentBox(
        h, 'segvol-return-segments', 'Per segment, one a line (optional)\nliver: misses segment VII', 'perSegment', r, 3
      )
    );
  }

  // the reviewer's To review list: oldest first, filtered by annotator and category
  function queueList(h, r) {
    const review = window.segvolReview;
    const select = (id, key, label, options) =>
      h(
        'label',
        { style: { marginRight: 6, color: '#9ab', fontSize: 11 } },
        label + ' ',
        h(
          'select',
          { id, value: r.filters[key], onChange: e => review.setFilter(key, e.target.value), style: { color: 'black', maxWidth: 110 } },
          h('option', { value: '' }, 'all'),
          [...new Set([...options, r.filters[key]].filter(Boolean))].map(o => h('option', { key: o, value: o }, o))
        )
      );
    const catalog = window.segvolSegments ? window.segvolSegments.catalog.entries.filter(e => e.configured).map(e => e.name) : [];
    return h(
      'div',
      { key: 'queue', style: { margin: '8px 0' } },
      h('div', { style: { fontWeight: 'bold' } }, `To review (${r.queue.length})`),
      h('div', { style: { margin: '3px 0' } }, select('segvol-review-annotator', 'annotator', 'annotator', r.seenAnnotators), select('segvol-review-category', 'category', 'category', [...new Set([...r.seenCategories, ...catalog])])),
      h(
        'ul',
        { id: 'segvol-review-list', style: { listStyle: 'none', paddingLeft: 0, margin: '2px 0', maxHeight: 260, overflowY: 'auto' } },
        r.queue.length
          ? r.queue.map(item =>
              h(
                'li',
                {
                  key: item.version,
                  id: `segvol-review-item-${item.version}`,
                  onClick: () => review.pick(item),
                  style: {
                    padding: 4,
                    marginBottom: 3,
                    cursor: 'pointer',
                    borderRadius: 4,
                    background: r.current && r.current.version === item.version ? '#0a5d8a' : '#1d2f40',
                  },
                },
                h(
                  'div',
                  null,
                  h('b', null, item.double_read ? item.double_read.annotators.join(' + ') : item.annotator),
                  ` · image ${short(item.image)} · waiting ${waiting(item.minutes_waiting)}`,
                  item.double_read ? h('span', { style: { color: '#fc6' } }, ' · double read') : null,
                  item.resubmits ? h('span', { style: { color: '#fc6' } }, ' · resubmitted') : null
                ),
                h('div', { style: { color: '#9ab', fontSize: 11 } }, `${(item.segments || []).map(origin).join('; ')} · model ${models(item).join(', ') || '?'}`)
              )
            )
          : h('li', { style: { color: '#9ab' } }, 'Nothing waits for review.')
      )
    );
  }

  // labels returned to this annotator, with the reviewer's comment
  function returnedList(h, r) {
    const review = window.segvolReview;
    if (!r.returned || !r.returned.length) return null;
    return h(
      'div',
      { key: 'returned', style: { margin: '8px 0' } },
      h('div', { style: { fontWeight: 'bold', color: '#fc6' } }, `Returned to you (${r.returned.length})`),
      h(
        'ul',
        { id: 'segvol-returned', style: { listStyle: 'none', paddingLeft: 0, margin: '2px 0' } },
        r.returned.map(x =>
          h(
            'li',
            {
              key: x.version,
              id: `segvol-returned-item-${x.version}`,
              onClick: () => review.visit(x),
              style: { padding: 4, marginBottom: 3, cursor: 'pointer', borderRadius: 4, background: '#3a2a10' },
            },
            h('div', null, `image ${short(x.image)} · version ${x.version} · by ${x.reviewer} at ${when(x.time)}`),
            h('div', { style: { whiteSpace: 'pre-wrap' } }, x.comment || ''),
            Object.entries(x.segments || {}).map(([name, text]) => h('div', { key: name, style: { fontSize: 11, color: '#fc6' } }, `${name}: ${text}`))
          )
        )
      )
    );
  }

  // the team's figures: per annotator and per category, and approved vs returned as bars
  function teamFigures(h, team) {
    if (!team) return null;
    const annotators = team.annotators || [];
    const categories = team.categories || [];
    const cell = (v, key) => h('td', { key, style: { textAlign: key ? 'right' : 'left', padding: '0 0 0 5px' } }, v);
    const table = (id, heads, rows) =>
      h(
        'table',
        { id, style: { width: '100%', fontSize: 11, borderCollapse: 'collapse', margin: '4px 0' } },
        h('thead', null, h('tr', { style: { color: '#9ab' } }, heads.map((c, n) => h('th', { key: c, style: { textAlign: n ? 'right' : 'left', padding: '0 0 0 5px' } }, c)))),
        h('tbody', null, rows)
      );
    const max = Math.max(1, ...annotators.map(a => Math.max(a.approved || 0, a.returned || 0)));
    const W = 250;
    const LABEL = 80;
    const ROW = 22;
    const bar = w => Math.max(0, ((W - LABEL - 24) * w) / max);
    const chart = h(
      'svg',
      { id: 'segvol-team-chart', width: '100%', viewBox: `0 0 ${W} ${18 + ROW * annotators.length}`, style: { display: 'block', margin: '4px 0', maxWidth: W } },
      h('rect', { x: LABEL, y: 2, width: 9, height: 9, fill: '#3c9' }),
      h('text', { x: LABEL + 12, y: 10, fill: '#ccc', fontSize: 10 }, 'approved'),
      h('rect', { x: LABEL + 70, y: 2, width: 9, height: 9, fill: '#e55' }),
      h('text', { x: LABEL + 82, y: 10, fill: '#ccc', fontSize: 10 }, 'returned'),
      annotators.map((a, n) => {
        const y = 16 + n * ROW;
        return h(
          'g',
          { key: a.client, 'data-client': a.client },
          h('text', { x: 0, y: y + 13, fill: '#ddd', fontSize: 10 }, a.client.length > 13 ? a.client.slice(0, 12) + '…' : a.client),
          h('rect', { x: LABEL, y: y + 2, width: bar(a.approved || 0), height: 8, fill: '#3c9', 'data-kind': 'approved' }),
          h('text', { x: LABEL + bar(a.approved || 0) + 3, y: y + 10, fill: '#ccc', fontSize: 9 }, String(a.approved || 0)),
          h('rect', { x: LABEL, y: y + 11, width: bar(a.returned || 0), height: 8, fill: '#e55', 'data-kind': 'returned' }),
          h('text', { x: LABEL + bar(a.returned || 0) + 3, y: y + 19, fill: '#ccc', fontSize: 9 }, String(a.returned || 0))
        );
      })
    );
    return h(
      'div',
      { key: 'team', id: 'segvol-team', style: { margin: '8px 0' } },
      h('div', { style: { fontWeight: 'bold' } }, 'Team figures'),
      annotators.length ? chart : null,
      table(
        'segvol-team-annotators',
        ['annotator', 'saved', 'appr.', 'ret.', 'min', 'Dice'],
        annotators.map(a =>
          h('tr', { key: a.client }, cell(a.client, 0), cell(a.saved ?? '–', 1), cell(a.approved ?? '–', 2), cell(a.returned ?? '–', 3), cell(fixed(a.median_minutes_to_save, 1), 4), cell(fixed(a.agreement_dice, 3), 5))
        )
      ),
      table(
        'segvol-team-categories',
        ['category', 'rev.', 'ret.', 'rate', 'Dice', 'pairs'],
        categories.map(c =>
          h(
            'tr',
            { key: c.name },
            cell(c.name, 0),
            cell(c.reviewed ?? '–', 1),
            cell(c.returned ?? '–', 2),
            cell(typeof c.return_rate === 'number' ? Math.round(100 * c.return_rate) + '%' : '–', 3),
            cell(fixed(c.agreement_dice, 3), 4),
            cell(c.pairs ?? '–', 5)
          )
        )
      ),
      h('a', { href: `/segvol/team?${new URLSearchParams({ client_id: window.segvolWorkspace.annotator(), format: 'csv' })}`, target: '_blank', style: { color: '#8cf', fontSize: 11 } }, 'CSV')
    );
  }

  window.segvolReview = review;
})();
