// segvol-label: the SegVol workspace panel (sent after box-prompt.js, before review-panel.js and
// segvol-mode.js): what the annotator sees of window.segvolWorkspace (segvol-mode.js), drawn with
// the bundle's React; the review sections are review-panel.js's (window.segvolReview).
(function () {
  'use strict';
  const ohif = window.segvolOhif;
  if (!ohif || !window.segvolSegments || !window.segvolBox) return;
  const { catalog } = window.segvolSegments;
  const { box } = window.segvolBox;
  const when = iso => (iso ? iso.slice(11, 16) : '?');
  // How far the background scorer has come for the served model (lib/activelearning/scorer.py).
  const scoringLine = sc =>
    `${sc.scored} of ${sc.unlabelled} unlabelled images scored by the served model` +
    (sc.state === 'scoring' ? ' (scoring now)' : sc.scored < sc.unlabelled ? ' (the rest: earlier scores or random)' : '');
  function WorkspacePanel() {
    const workspace = window.segvolWorkspace;
    const { createElement: h, useEffect, useState } = ohif.react();
    const [state, setState] = useState({ ...workspace.state });
    const [name, setName] = useState(workspace.annotator());
    useEffect(() => {
      workspace.listeners.add(setState);
      workspace.info().catch(e => workspace.say(`Cannot reach the server: ${e.message}`, false));
      workspace.refresh();
      workspace.loadHistory();
      if (window.segvolReview) window.segvolReview.load(); // review-panel.js: roles, the review lists
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
          onBlur: () => workspace.rename(name.trim()),
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
            onChange: e => workspace.setStrategy(e.target.value),
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
      state.conflict ? conflictDialog(h, state.conflict, button) : null,
      window.segvolReview ? window.segvolReview.sections(h, state, button) : null,
      activeRow(h, state),
      findBox(h, state),
      boxSection(h, state, button),
      h('hr', { style: { borderColor: '#345', margin: '8px 0' } }),
      row('Model:', s.model_version || '...', 'segvol-model'),
      s.scoring ? row('Next image:', scoringLine(s.scoring), 'segvol-scoring') : null,
      state.autosaved ? row('Unsaved work:', `autosaved at ${when(state.autosaved)}`, 'segvol-autosaved') : null,
      s.warning ? h('div', { style: { color: '#fc6', fontSize: 11 } }, s.warning) : null,
      s.error ? h('div', { style: { color: '#f88' } }, s.error) : null,
      row(
        'Your image:',
        !s.lease
          ? 'none leased'
          : s.lease.image === ohif.currentSeries()?.series
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

  // A colleague's newer label: open it, take segments from both, or save anyway as a new version.
  function conflictDialog(h, conflict, button) {
    const workspace = window.segvolWorkspace;
    const n = conflict.newest;
    return h(
      'div',
      { id: 'segvol-conflict', style: { margin: '6px 0', padding: 8, border: '2px solid #e80', borderRadius: 4, background: '#3a2a10' } },
      h('div', { style: { fontWeight: 'bold', marginBottom: 4 } }, `${n.client} saved a newer label at ${when(n.time)}`),
      h('div', { style: { marginBottom: 6 } }, `Version ${n.version}; your edit started from ${workspace.basedOn ? 'version ' + workspace.basedOn : 'no label'}. Nothing is lost whichever you choose.`),
      button('segvol-conflict-open', 'Open theirs', () => workspace.resolve('open')),
      button('segvol-conflict-merge', 'Take segments from both', () => workspace.resolve('merge')),
      button('segvol-conflict-force', 'Save mine as a new version', () => workspace.resolve('force'))
    );
  }

  // the segment the brush, the scissors and the box prompt work on: always in view
  function activeRow(h, state) {
    const a = state.active;
    const swatch = a ? `rgb(${a.colour.join(',')})` : 'transparent';
    return h(
      'div',
      { id: 'segvol-active', style: { margin: '6px 0', padding: 6, borderRadius: 4, background: a && a.chosen ? '#1d2f40' : '#4a3a10' } },
      h('span', { style: { color: '#9ab' } }, 'Painting: '),
      h('span', { style: { display: 'inline-block', width: 12, height: 12, marginRight: 5, background: swatch, border: '1px solid #ccc', verticalAlign: 'middle' } }),
      h('b', { id: 'segvol-active-name' }, a && a.chosen ? a.label : 'no segment chosen'),
      a && a.chosen ? null : h('div', { style: { fontSize: 11, color: '#fc6' } }, 'Pick one in the segment list or find it below: strokes paint nothing until then.')
    );
  }

  // any SegVol category one search away: the team's first, then the whole vocabulary
  function findBox(h, state) {
    const workspace = window.segvolWorkspace;
    const hits = state.search ? catalog.search(state.search) : [];
    return h(
      'div',
      { style: { margin: '6px 0' } },
      h('input', {
        id: 'segvol-find',
        placeholder: 'Find a structure (e.g. liver, T12 vertebra)',
        value: state.search,
        onChange: e => workspace.set({ search: e.target.value }),
        onKeyDown: e => e.key === 'Enter' && hits.length && workspace.choose(hits[0].name),
        style: { width: '100%', color: 'black', padding: 3 },
      }),
      hits.length
        ? h(
            'ul',
            { id: 'segvol-find-hits', style: { listStyle: 'none', paddingLeft: 0, margin: '2px 0', maxHeight: 180, overflowY: 'auto', background: '#102030' } },
            hits.map((e, n) =>
              h(
                'li',
                { key: e.index, id: `segvol-find-${n}`, onClick: () => workspace.choose(e.name), style: { padding: '2px 4px', cursor: 'pointer' } },
                h('span', { style: { display: 'inline-block', width: 10, height: 10, marginRight: 5, background: `rgb(${e.colour.join(',')})` } }),
                e.name,
                e.configured ? h('span', { style: { color: '#9ab', fontSize: 11 } }, ' · team') : null
              )
            )
          )
        : null
    );
  }

  // the 3D box prompt: draw on any view, set the slices, run for the active segment
  function boxSection(h, state, button) {
    const workspace = window.segvolWorkspace;
    const b = state.box;
    const bound = (axis, end) =>
      h('input', {
        id: `segvol-box-${'ijk'[axis]}${end === 'lo' ? 0 : 1}`,
        type: 'number',
        value: b[end][axis],
        onChange: e => box.setBound(axis, end, Number(e.target.value)),
        style: { width: 52, color: 'black', marginRight: 4 },
      });
    const axisRow = (axis, label) => h('div', { style: { margin: '2px 0' } }, h('span', { style: { color: '#9ab', display: 'inline-block', width: 92 } }, label), bound(axis, 'lo'), '–', ' ', bound(axis, 'hi'));
    const mode = m => (b.mode === m ? ' ✓' : '');
    return h(
      'div',
      { id: 'segvol-box', style: { margin: '8px 0', padding: 6, border: '1px solid #345', borderRadius: 4 } },
      h('div', { style: { fontWeight: 'bold', marginBottom: 4 } }, 'Box prompt'),
      button('segvol-box-draw', 'Draw box' + mode('box'), () => box.setMode('box')),
      button('segvol-box-positive', '+ point' + mode('positive'), () => box.setMode('positive')),
      button('segvol-box-negative', '− point' + mode('negative'), () => box.setMode('negative')),
      button('segvol-box-clear', 'Clear', () => box.clear(), !b.lo && !b.points),
      b.mode ? h('div', { style: { color: '#fc6', fontSize: 11 } }, b.mode === 'box' ? 'Drag a rectangle on any view.' : 'Click on a view to place the point.') : null,
      b.lo ? h('div', null, axisRow(0, 'i (columns)'), axisRow(1, 'j (rows)'), axisRow(2, 'k (slices)')) : null,
      b.points ? h('div', { style: { color: '#9ab', fontSize: 11 } }, `${b.points} point(s)`) : null,
      h(
        'label',
        { style: { display: 'block', margin: '4px 0', color: '#9ab' } },
        h('input', { id: 'segvol-box-text', type: 'checkbox', checked: b.withText, onChange: e => ((box.withText = e.target.checked), box.changed()) }),
        ' with the segment name as text prompt'
      ),
      button('segvol-box-run', 'Run box', () => workspace.runBox(), !b.lo && !b.points)
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

  window.segvolPanel = { WorkspacePanel };
})();
