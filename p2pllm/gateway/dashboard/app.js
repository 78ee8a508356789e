/* The p2pllm dashboard: plain JavaScript, no framework, no build step, nothing from the network
 * but this gateway. Every number comes from the gateway's own API (docs/dashboard.md):
 *   GET  v1/cluster/events      one snapshot a second: {status: `p2pllm status --json`, metrics: /metrics' numbers}
 *   GET  v1/history?limit=N     the recent requests
 *   GET  v1/models              the model id the chat panel asks for
 *   POST v1/chat/completions    the chat panel, streamed
 *   POST v1/peers               test or add a static peer; POST v1/peers/ID/drain|admit
 * Each call sends `Authorization: Bearer KEY` when the tab has a key; a 401 shows the login field.
 * EventSource cannot send that header, so server-sent events are read from fetch()'s body. */
(() => {
  'use strict';

  const KEY_STORAGE = 'p2pllm.apiKey';
  const CHART_POINTS = 120;
  const HISTORY_LIMIT = 20;
  const HISTORY_IDLE_MS = 15000;
  const HISTORY_SETTLE_MS = 5000;
  const STALE_MS = 3500; // the connection shows "stale" after this long without a snapshot
  const SILENT_MS = 8000; // and the stream is opened again after this long

  const $ = (selector) => document.querySelector(selector);

  // ------------------------------------------------------------------ API
  class AuthError extends Error {}
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  const apiKey = () => sessionStorage.getItem(KEY_STORAGE) || '';

  async function api(path, { method = 'GET', body, signal } = {}) {
    const headers = {};
    const key = apiKey();
    if (key) headers.Authorization = 'Bearer ' + key;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const response = await fetch(path, {
      method, headers, signal, cache: 'no-store', body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      const message = await errorMessage(response);
      needLogin(message);
      throw new AuthError(message);
    }
    return response;
  }

  async function apiJSON(path, options) {
    const response = await api(path, options);
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    return response.json();
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }

  /** The `data:` payloads of a text/event-stream response, one string per event. */
  async function* sseData(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, '');
        const data = block.split(/\r?\n/).filter((line) => line.startsWith('data:'))
          .map((line) => line.slice(5).replace(/^ /, '')).join('\n');
        if (data) yield data;
      }
    }
  }

  const sleep = (ms, signal) => new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });

  // ------------------------------------------------------------------ formatting
  function fmtBytes(n) {
    if (n === null || n === undefined) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i === 0 ? 0 : n >= 100 ? 0 : n >= 10 ? 1 : 2)} ${units[i]}`;
  }
  const fmtNumber = (n, digits = 1) => (n === null || n === undefined || Number.isNaN(n) ? '–' : n.toFixed(digits));
  const fmtCount = (n) => (n === null || n === undefined ? '–' : String(Math.round(n)));
  const fmtLayers = (range) => (range ? `[${range[0]}, ${range[1]})` : '–');
  const fmtTime = (unixSeconds) => new Date(unixSeconds * 1000).toLocaleTimeString([], { hour12: false });
  const stageRange = (stage) => (stage.layers ? stage.layers : [stage.start, stage.end]);

  /** One colour per peer (by id: two peers may share a name), kept for the page's life: the first snapshot's
   * peers take the palette in name order, later ones the next colour. */
  const PALETTE = ['#2f6fdb', '#d9822b', '#2f9e6e', '#9b4dca', '#c94f6d', '#1f9bb0', '#8a6d1f', '#5b6ee1',
    '#c0392b', '#6b7a8f'];
  const colors = new Map();
  function peerColor(id) {
    if (!colors.has(id)) colors.set(id, PALETTE[colors.size % PALETTE.length]);
    return colors.get(id);
  }
  const byName = (a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null) continue;
      if (key === 'class') node.className = value;
      else if (key === 'style') Object.assign(node.style, value);
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  function say(output, message, kind) {
    output.dataset.kind = kind;
    output.replaceChildren(message);
  }

  // ------------------------------------------------------------------ session: the loops that run while signed in
  let session = null; // the AbortController of the running loops
  const state = { model: undefined, counters: null, activeUntil: 0, lastRequestRate: null };
  let lastSnapshot = null;
  let lastSnapshotAt = 0;

  function start() {
    if (session) session.abort();
    session = new AbortController();
    document.body.dataset.auth = 'ok';
    $('#login').hidden = true;
    $('#logout').hidden = !apiKey();
    loadModel(session.signal);
    clusterLoop(session.signal);
    historyLoop(session.signal);
  }

  function needLogin(message) {
    if (document.body.dataset.auth === 'needed') return; // the first 401 of several says it
    if (session) session.abort();
    session = null;
    const refused = Boolean(apiKey());
    sessionStorage.removeItem(KEY_STORAGE);
    document.body.dataset.auth = 'needed';
    $('#login').hidden = false;
    $('#logout').hidden = true;
    $('#login-error').textContent = refused ? `The gateway refused this key: ${message}` : '';
    setConn('offline', 'sign in with the API key');
    $('#api-key').focus();
  }

  $('#login-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const key = $('#api-key').value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $('#api-key').value = '';
    start();
  });

  $('#logout').addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORAGE);
    needLogin('');
  });

  function setConn(kind, detail) {
    const conn = $('#conn');
    conn.dataset.state = kind;
    conn.textContent = kind;
    conn.title = detail || 'the live stream of cluster snapshots (GET /v1/cluster/events)';
  }

  setInterval(() => {
    if (session && lastSnapshot && Date.now() - lastSnapshotAt > STALE_MS && $('#conn').dataset.state === 'live') {
      setConn('stale', 'no snapshot for a few seconds');
    }
  }, 1000);

  async function loadModel(signal) {
    try {
      const body = await apiJSON('v1/models', { signal });
      state.model = body.data && body.data[0] ? body.data[0].id : undefined;
      $('#model').textContent = state.model || '';
    } catch (e) { /* the chat panel works without it; the snapshot loop reports the connection */ }
  }

  // ------------------------------------------------------------------ the snapshot stream
  /** Reads the snapshot stream, and opens it again when it ends, fails or goes silent (a stream that
   * stops without closing, as one through a dead network does, is given up after SILENT_MS). */
  async function clusterLoop(signal) {
    let delay = 1000;
    while (!signal.aborted) {
      const stream = new AbortController();
      const stop = () => stream.abort();
      signal.addEventListener('abort', stop, { once: true });
      let heard = Date.now();
      const watchdog = setInterval(() => { if (Date.now() - heard > SILENT_MS) stop(); }, 1000);
      try {
        const response = await api('v1/cluster/events', { signal: stream.signal });
        if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
        for await (const data of sseData(response)) {
          heard = Date.now();
          applySnapshot(JSON.parse(data));
          delay = 1000;
        }
        if (!signal.aborted) setConn('offline', 'the event stream ended; reconnecting');
      } catch (e) {
        if (signal.aborted || e instanceof AuthError) return;
        const why = stream.signal.aborted ? 'no snapshot for a while' : e.message;
        setConn('offline', `${why}; reconnecting`);
      } finally {
        clearInterval(watchdog);
        signal.removeEventListener('abort', stop);
      }
      await sleep(delay, signal);
      delay = Math.min(delay * 2, 10000);
    }
  }

  function applySnapshot(snapshot) {
    lastSnapshot = snapshot;
    lastSnapshotAt = Date.now();
    setConn('live');
    const status = snapshot.status || {};
    const metrics = snapshot.metrics || {};
    $('#updated').textContent = snapshot.time ? `updated ${fmtTime(snapshot.time)}` : '';
    [...(status.peers || [])].sort(byName).forEach((peer) => peerColor(peer.id));
    renderHeader(status);
    renderPlan(status, metrics);
    renderPeers(status);
    renderBackends(status);
    pushCharts(metrics);
    // while requests come and go (this gateway's token or error counters move, the ring has work) and for
    // HISTORY_SETTLE_MS after, the history is read every second or two; otherwise every HISTORY_IDLE_MS
    const counters = [metrics.prompt_tokens_total, metrics.completion_tokens_total, metrics.errors_total].join('/');
    if (counters !== state.counters || metrics.running > 0 || metrics.queued > 0) {
      state.activeUntil = Date.now() + HISTORY_SETTLE_MS;
    }
    if (state.counters !== null && counters !== state.counters) kickHistory();
    state.counters = counters;
  }

  function nameOf(status, id) {
    const peer = (status.peers || []).find((p) => p.id === id);
    return peer ? peer.name : id ? id.slice(0, 8) : '–';
  }

  function renderHeader(status) {
    const coordinator = nameOf(status, status.coordinator);
    $('#this-peer').textContent = `via ${status.name || nameOf(status, status.id)} · coordinator ${coordinator}`;
  }

  // ------------------------------------------------------------------ plan
  function renderPlan(status, metrics) {
    const plan = status.plan;
    $('#plan-epoch').textContent = status.epoch ?? '–';
    const stages = plan && plan.feasible !== false ? plan.stages || [] : [];
    $('#plan-strategy').textContent = plan
      ? [plan.strategy, plan.objective, plan.micro_batches ? `${plan.micro_batches} micro-batches` : null]
        .filter(Boolean).join(' · ')
      : '';

    // segments are keyed by the stage's peer id (stage.peer): names are what is shown, and two peers may share one
    const bar = $('#plan-bar');
    const keep = new Set();
    stages.forEach((stage, index) => {
      const name = stage.name || nameOf(status, stage.peer);
      const [start, end] = stageRange(stage);
      keep.add(stage.peer);
      let segment = bar.querySelector(`[data-plan-peer="${CSS.escape(stage.peer)}"]`);
      if (!segment) {
        segment = el('div', { class: 'segment', dataset: { planPeer: stage.peer } }, el('span'), el('span'));
        segment.style.background = peerColor(stage.peer);
        bar.append(segment);
      }
      segment.style.flexGrow = String(Math.max(end - start, 0));
      segment.style.order = String(index);
      segment.dataset.start = start;
      segment.dataset.end = end;
      segment.classList.toggle('bottleneck', plan.bottleneck === stage.peer);
      segment.children[0].textContent = name;
      segment.children[1].textContent = `${start}–${end}`;
      segment.title = `${name}: layers [${start}, ${end})` +
        (stage.ms_per_token !== undefined ? `, ${fmtNumber(stage.ms_per_token)} ms/token` : '') +
        (stage.memory && stage.memory.total ? `, ${fmtBytes(stage.memory.total)} planned` : '') +
        (plan.bottleneck === stage.peer ? ' (the bottleneck)' : '');
    });
    for (const segment of [...bar.children]) {
      if (!keep.has(segment.dataset.planPeer)) segment.remove();
    }
    bar.dataset.segments = String(stages.length);
    bar.setAttribute('aria-label', stages.map((s) => `${s.name || nameOf(status, s.peer)} ${fmtLayers(stageRange(s))}`)
      .join(', ') || 'no plan');

    $('#plan-stages').replaceChildren(...stages.map((stage) => {
      const name = stage.name || nameOf(status, stage.peer);
      return el('li', { dataset: { stagePeer: stage.peer } },
        el('span', { class: 'swatch', style: { background: peerColor(stage.peer) } }), el('b', {}, name),
        ` ${fmtLayers(stageRange(stage))}`,
        stage.ms_per_token !== undefined ? ` · ${fmtNumber(stage.ms_per_token)} ms/token` : '',
        stage.memory && stage.memory.total ? ` · ${fmtBytes(stage.memory.total)} planned` : '',
        plan.bottleneck === stage.peer ? ' · bottleneck' : '');
    }));

    const outside = (status.peers || []).filter((p) => !p.layers).map((p) =>
      `${p.name} (${p.drained ? 'drained' : p.excluded_reason || p.state})`);
    let note = '';
    if (!plan) note = 'No plan yet: the peers have not agreed on one.';
    else if (plan.feasible === false) note = `No feasible plan: ${plan.reason || 'the model does not fit'}.`;
    if (outside.length) note += `${note ? ' ' : ''}Not in the plan: ${outside.join(', ')}.`;
    $('#plan-note').textContent = note;

    const predicted = plan && plan.predicted;
    $('#plan-predicted').textContent = predicted
      ? `${fmtNumber(predicted.tokens_per_s_single)} tokens/s for one stream, ` +
        `${fmtNumber(predicted.tokens_per_s_pipelined)} tokens/s with ${predicted.batch} in flight`
      : '–';
    $('#plan-measured').textContent = `${fmtNumber(metrics.tokens_per_s)} tokens/s now` +
      (state.lastRequestRate !== null ? `, ${fmtNumber(state.lastRequestRate)} tokens/s in the last request` : '');
  }

  // ------------------------------------------------------------------ peers
  const pending = new Map(); // peer id -> 'drain' | 'admit' while the call runs

  const TONES = {
    serving: 'ok', ready: 'ok', loading: 'warn', idle: 'warn', leaving: 'warn', drained: 'warn', lost: 'bad',
  };
  const COLUMNS = ['Peer', 'Address', 'Device', 'Memory used / limit', 'Layers', 'Health', 'Link RTT', ''];

  function renderPeers(status) {
    const peers = [...(status.peers || [])].sort(byName);
    $('#peer-count').textContent = `${peers.length} peer${peers.length === 1 ? '' : 's'}, ` +
      `${peers.filter((p) => p.healthy).length} healthy`;
    const tbody = $('#peer-rows');
    // rows are keyed by the peer's id: two peers may share a name (the default is the hostname)
    const rows = new Map([...tbody.children].map((row) => [row.dataset.peer, row]));
    peers.forEach((peer, index) => {
      let row = rows.get(peer.id);
      if (!row) {
        row = el('tr', { dataset: { peer: peer.id } },
          ...COLUMNS.map((label) => el('td', { 'data-label': label })));
      }
      rows.delete(peer.id);
      row.dataset.name = peer.name; // shown; a peer's name may change when it rejoins
      if (tbody.children[index] !== row) tbody.insertBefore(row, tbody.children[index] || null);
      fillPeerRow(row, peer, status);
    });
    for (const row of rows.values()) row.remove();
  }

  /** Sets a cell's content only when it changed, so that a button is not replaced under a click. */
  function setCell(cell, key, build) {
    if (cell.dataset.key === key) return;
    cell.dataset.key = key;
    cell.replaceChildren(...[].concat(build()).filter((child) => child !== null && child !== undefined));
  }

  function fillPeerRow(row, peer, status) {
    const [name, address, device, memory, layers, health, rtt, actions] = row.children;
    const badges = [peer.coordinator && 'coordinator', peer.id === status.id && 'this peer'].filter(Boolean);
    setCell(name, JSON.stringify([peer.name, badges]), () => [
      el('span', { class: 'swatch', style: { background: peerColor(peer.id) } }), peer.name,
      ...badges.map((b) => el('span', { class: 'badge' }, b))]);
    name.title = peer.id;
    address.textContent = peer.address;
    device.textContent = peer.device || '–';
    memory.className = 'num';
    memory.textContent = `${fmtBytes(peer.mem_used)} / ${fmtBytes(peer.mem_limit)}`;
    memory.dataset.memUsed = peer.mem_used ?? '';
    memory.dataset.memLimit = peer.mem_limit ?? '';
    layers.className = 'num';
    layers.textContent = fmtLayers(peer.layers);
    layers.dataset.layers = peer.layers ? peer.layers.join(',') : '';
    const stateLabel = peer.state + (peer.healthy || peer.state === 'lost' ? '' : ' (unhealthy)');
    setCell(health, JSON.stringify([stateLabel, peer.excluded_reason]), () => [
      el('span', { class: 'state', dataset: { tone: TONES[peer.state] || '' } }, stateLabel),
      peer.excluded_reason ? el('span', { class: 'reason' }, peer.excluded_reason) : null]);
    health.dataset.state = peer.state;
    rtt.className = 'num';
    rtt.textContent = peer.rtt_ms === null || peer.rtt_ms === undefined ? '–' : `${peer.rtt_ms.toFixed(2)} ms`;
    rtt.title = peer.id === status.id ? 'this peer' : `measured by ${status.name || 'this peer'}`;
    actions.className = 'actions';
    const busy = pending.get(peer.id);
    const action = busy || (peer.drained ? 'admit' : peer.state === 'lost' ? null : 'drain');
    setCell(actions, JSON.stringify([action, Boolean(busy), peer.name]), () => (action ? el('button', {
      type: 'button', class: action === 'drain' ? 'quiet' : '', dataset: { action, peer: peer.id, name: peer.name },
      disabled: busy ? '' : null, title: action === 'drain'
        ? 'take this peer out of the plan (it stays up and listed)' : 'let the planner use this peer again',
    }, busy ? `${busy === 'drain' ? 'Draining' : 'Admitting'}…` : action === 'drain' ? 'Drain' : 'Admit') : []));
  }

  $('#peer-rows').addEventListener('click', (event) => {
    const button = event.target.closest('button[data-action]');
    if (button && !button.disabled) manage(button.dataset.peer, button.dataset.name, button.dataset.action);
  });

  /** Drains or admits the peer `id` (by id, which the cluster resolves even where names repeat); `name` is shown. */
  async function manage(id, name, action) {
    const output = $('#manage-result');
    pending.set(id, action);
    if (lastSnapshot) renderPeers(lastSnapshot.status);
    say(output, `${action === 'drain' ? 'Draining' : 'Admitting'} ${name}: waiting for the plan change…`, 'busy');
    try {
      const reply = await apiJSON(`v1/peers/${encodeURIComponent(id)}/${action}`, { method: 'POST' });
      say(output, reply.message || `${action} ${name}: done`, 'ok');
    } catch (e) {
      if (!(e instanceof AuthError)) say(output, `${action} ${name}: ${e.message}`, 'error');
    } finally {
      pending.delete(id);
      if (lastSnapshot) renderPeers(lastSnapshot.status);
    }
  }

  async function addPeer(add) {
    const address = $('#peer-address').value.trim();
    const output = $('#peer-result');
    if (!address) {
      say(output, 'Give a peer address, host:port (its gRPC port).', 'error');
      return;
    }
    for (const button of [$('#peer-test'), $('#peer-add')]) button.disabled = true;
    say(output, `${add ? 'Adding' : 'Testing'} ${address}…`, 'busy');
    try {
      const reply = await apiJSON('v1/peers', { method: 'POST', body: { address, test: !add } });
      const good = reply.reachable && reply.compatible !== false && (!add || reply.added !== false);
      output.dataset.kind = good ? 'ok' : 'error';
      output.dataset.reachable = String(Boolean(reply.reachable));
      output.dataset.compatible = String(reply.compatible);
      const facts = [
        ['reachable', reply.reachable ? 'yes' : 'no'],
        ['RTT', reply.rtt_ms === null || reply.rtt_ms === undefined ? '–' : `${reply.rtt_ms.toFixed(2)} ms`],
        ['compatible', typeof reply.compatible === 'boolean' ? (reply.compatible ? 'yes' : 'no') : '–'],
        ['name', reply.name], ['cluster', reply.cluster], ['protocol', reply.protocol],
      ].filter(([, v]) => v !== null && v !== undefined && v !== '');
      output.replaceChildren(el('div', {}, reply.message || ''),
        el('dl', {}, ...facts.map(([k, v]) => el('div', {}, el('dt', {}, k), el('dd', {}, String(v))))));
    } catch (e) {
      if (!(e instanceof AuthError)) say(output, e.message, 'error');
    } finally {
      for (const button of [$('#peer-test'), $('#peer-add')]) button.disabled = false;
    }
  }

  $('#peer-test').addEventListener('click', () => addPeer(false));
  $('#add-peer').addEventListener('submit', (event) => { event.preventDefault(); addPeer(true); });

  // ------------------------------------------------------------------ backends
  /** This gateway's external OpenAI-compatible servers (`join --backend URL`): `status.backends`, the rows of
   * backends.py's BackendPool.rows(). The panel is hidden while there are none. */
  const BACKEND_COLUMNS = ['Backend', 'URL', 'Model', 'Health', 'In flight / max', 'Served', 'Failed'];
  const BACKEND_HEALTH = { true: ['ok', 'ok'], false: ['DOWN', 'bad'], null: ['unknown', 'warn'] };

  function renderBackends(status) {
    const backends = Array.isArray(status.backends) ? status.backends : [];
    $('#backends-panel').hidden = backends.length === 0;
    const up = backends.filter((b) => b.healthy === true).length;
    $('#backend-count').textContent = `${backends.length} backend${backends.length === 1 ? '' : 's'}, ` +
      `${up} in rotation`;
    const tbody = $('#backend-rows');
    const rows = new Map([...tbody.children].map((row) => [row.dataset.backend, row]));
    backends.forEach((backend, index) => {
      let row = rows.get(backend.id);
      if (!row) {
        row = el('tr', { dataset: { backend: backend.id } },
          ...BACKEND_COLUMNS.map((label) => el('td', { 'data-label': label })));
      }
      rows.delete(backend.id);
      if (tbody.children[index] !== row) tbody.insertBefore(row, tbody.children[index] || null);
      fillBackendRow(row, backend);
    });
    for (const row of rows.values()) row.remove();
  }

  function fillBackendRow(row, backend) {
    const [id, url, model, health, inFlight, served, failed] = row.children;
    setCell(id, JSON.stringify([backend.id, backend.type]), () => [
      backend.id, backend.type ? el('span', { class: 'badge' }, backend.type) : null]);
    url.className = 'url';
    url.textContent = backend.url || '–';
    model.textContent = backend.model || '–';
    const healthy = backend.healthy === true || backend.healthy === false ? backend.healthy : null;
    const [label, tone] = BACKEND_HEALTH[healthy];
    // one wrapper, so that on a phone's card the reason goes under the state instead of stretching it
    setCell(health, JSON.stringify([label, backend.reason]), () => el('div', {},
      el('span', { class: 'state', dataset: { tone } }, label),
      backend.reason ? el('span', { class: 'reason' }, backend.reason) : null));
    health.dataset.healthy = String(healthy);
    health.title = healthy === true ? 'in rotation' : 'out of rotation: requests go to the ring or another backend';
    inFlight.className = 'num';
    inFlight.textContent = `${fmtCount(backend.in_flight)} / ${fmtCount(backend.max_concurrent)}`;
    served.className = 'num';
    served.textContent = fmtCount(backend.served);
    failed.className = 'num';
    failed.textContent = fmtCount(backend.failed);
  }

  // ------------------------------------------------------------------ charts
  /** A rolling line chart of the last CHART_POINTS samples, drawn on a canvas at the screen's resolution. */
  class LineChart {
    constructor(canvas, label, series, format) {
      this.canvas = canvas;
      this.label = label;
      this.series = series; // CSS colour variables, one per line
      this.format = format;
      this.data = series.map(() => []);
      this.samples = 0;
    }

    push(values) {
      values.forEach((value, i) => {
        const line = this.data[i];
        line.push(typeof value === 'number' && Number.isFinite(value) ? value : null);
        if (line.length > CHART_POINTS) line.shift();
      });
      this.samples += 1;
      this.canvas.dataset.samples = String(this.samples);
      const latest = values.map((v) => this.format(v));
      this.canvas.setAttribute('aria-label', `${this.label}: ${latest.join(' / ')}`);
      this.draw();
      return latest;
    }

    draw() {
      const canvas = this.canvas;
      const width = canvas.clientWidth;
      const height = canvas.clientHeight;
      if (!width || !height) return;
      const dpr = window.devicePixelRatio || 1;
      if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
        canvas.width = Math.round(width * dpr);
        canvas.height = Math.round(height * dpr);
      }
      const ctx = canvas.getContext('2d');
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, width, height);
      const css = getComputedStyle(document.documentElement);
      const color = (name) => css.getPropertyValue(name).trim() || '#888';

      let max = 0;
      for (const line of this.data) for (const v of line) if (v !== null && v > max) max = v;
      const top = niceCeil(max);
      const padTop = 14;
      const plotHeight = height - padTop - 2;
      const y = (v) => padTop + plotHeight * (1 - v / top);
      const step = width / (CHART_POINTS - 1);

      ctx.strokeStyle = color('--grid');
      ctx.lineWidth = 1;
      for (const fraction of [0, 0.5, 1]) {
        const gy = Math.round(y(top * fraction)) + 0.5;
        ctx.beginPath();
        ctx.moveTo(0, gy);
        ctx.lineTo(width, gy);
        ctx.stroke();
      }
      ctx.fillStyle = color('--muted');
      ctx.font = '11px system-ui, sans-serif';
      ctx.textBaseline = 'bottom';
      if (max > 0) ctx.fillText(this.format(top), 2, padTop - 1); // the top grid line's value

      this.data.forEach((line, i) => {
        const x = (j) => width - (line.length - 1 - j) * step;
        ctx.strokeStyle = color(this.series[i]);
        ctx.lineWidth = 1.6;
        ctx.beginPath();
        let drawing = false;
        line.forEach((v, j) => {
          if (v === null) { drawing = false; return; }
          if (drawing) ctx.lineTo(x(j), y(v)); else ctx.moveTo(x(j), y(v));
          drawing = true;
        });
        ctx.stroke();
      });
    }
  }

  /** The smallest of 1, 2, 2.5, 5 x 10^k at or above `value` (1 for nothing yet). */
  function niceCeil(value) {
    if (!(value > 0)) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * power >= value) return m * power;
    return 10 * power;
  }

  const charts = {
    tps: new LineChart($('#chart-tps'), 'tokens/s', ['--series-1'], (v) => fmtNumber(v)),
    queue: new LineChart($('#chart-queue'), 'queued requests', ['--series-1'], fmtCount),
    running: new LineChart($('#chart-running'), 'sequences in flight', ['--series-1'], fmtCount),
    memory: new LineChart($('#chart-memory'), 'KV / replica memory', ['--series-1', '--series-2'], fmtBytes),
  };

  function pushCharts(metrics) {
    $('#chart-tps-value').textContent = charts.tps.push([metrics.tokens_per_s])[0];
    $('#chart-queue-value').textContent = charts.queue.push([metrics.queued])[0];
    $('#chart-running-value').textContent = charts.running.push([metrics.running])[0];
    const memory = charts.memory.push([metrics.kv_bytes, metrics.replica_bytes]);
    $('#chart-memory-value').textContent = `${memory[0]} / ${memory[1]}` +
      (metrics.kv_capacity_bytes ? ` of ${fmtBytes(metrics.kv_capacity_bytes)}` : '');
  }

  let resizeTimer = null;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => Object.values(charts).forEach((chart) => chart.draw()), 100);
  });

  // ------------------------------------------------------------------ history
  let historyDirty = false; // a completion ended since the last read
  let historyWake = null;
  function kickHistory() {
    historyDirty = true;
    if (historyWake) historyWake();
  }

  async function historyLoop(signal) {
    while (!signal.aborted) {
      historyDirty = false;
      try {
        renderHistory(await apiJSON(`v1/history?limit=${HISTORY_LIMIT}`, { signal }));
      } catch (e) {
        if (signal.aborted || e instanceof AuthError) return;
        $('#history-note').textContent = e.status === 404 ? `No request history: ${e.message}`
          : `The history could not be read: ${e.message}`;
      }
      await sleep(1000, signal); // at most one read a second, however often requests end
      if (historyDirty || signal.aborted) continue;
      await new Promise((resolve) => { // until a kick or the next read's time
        const wake = () => {
          clearTimeout(timer);
          signal.removeEventListener('abort', wake);
          historyWake = null;
          resolve();
        };
        const timer = setTimeout(wake, Date.now() < state.activeUntil ? 1000 : HISTORY_IDLE_MS);
        historyWake = wake;
        signal.addEventListener('abort', wake);
      });
    }
  }

  function renderHistory(body) {
    const records = body.data || [];
    // "the last request": the newest row generated by the ring or a backend; a cache replay measures no rate
    const first = records.find((r) => r.backend !== 'cache' && typeof r.tokens_per_s === 'number');
    state.lastRequestRate = first ? first.tokens_per_s : null;
    $('#history-note').textContent = records.length ? '' : 'No requests yet.';
    const labels = ['Time', 'Endpoint', 'Tokens in → out', 'First token', 'Tokens/s', 'Finish', 'Epoch', 'Served by'];
    $('#history-rows').replaceChildren(...records.map((r) => {
      const cells = [
        r.created ? fmtTime(r.created) : '–',
        (r.endpoint || '–').replace(/^\/v1\//, ''),
        `${fmtCount(r.prompt_tokens)} → ${fmtCount(r.completion_tokens)}`,
        r.ttft_ms === null || r.ttft_ms === undefined ? '–' : `${Math.round(r.ttft_ms)} ms`,
        fmtNumber(r.tokens_per_s),
        r.error || r.finish_reason || '–',
        r.epoch ?? '–',
        r.backend || '–',
      ];
      const row = el('tr', { dataset: { requestId: r.id } },
        ...cells.map((text, i) => el('td', { 'data-label': labels[i] }, String(text))));
      row.title = r.id;
      if (r.error) row.children[5].classList.add('error');
      return row;
    }));
  }

  // ------------------------------------------------------------------ chat
  const chat = { messages: [], controller: null };

  function addMessage(role, text) {
    const node = el('div', { class: `msg ${role}`, dataset: { role } }, text);
    const log = $('#chat-log');
    log.append(node);
    log.scrollTop = log.scrollHeight;
    return node;
  }

  function setChatBusy(busy) {
    $('#chat-send').disabled = busy;
    $('#chat-stop').disabled = !busy;
  }

  function numberInput(selector, fallback) {
    const value = Number($(selector).value);
    return $(selector).value !== '' && Number.isFinite(value) ? value : fallback;
  }

  async function sendChat() {
    const input = $('#chat-input');
    const prompt = input.value.trim();
    if (!prompt || chat.controller) return;
    input.value = '';
    chat.messages.push({ role: 'user', content: prompt });
    addMessage('user', prompt);
    const answer = addMessage('assistant', '');
    answer.dataset.state = 'waiting';
    const body = {
      messages: chat.messages.slice(), stream: true, stream_options: { include_usage: true },
      temperature: numberInput('#chat-temperature', 0.7), max_tokens: Math.round(numberInput('#chat-max-tokens', 256)),
    };
    if (state.model) body.model = state.model;
    chat.controller = new AbortController();
    setChatBusy(true);
    $('#chat-stats').textContent = '';
    const started = performance.now();
    let first = null;
    let text = '';
    let usage = null;
    let finish = null;
    let chunks = 0;
    const log = $('#chat-log');
    try {
      const response = await api('v1/chat/completions', { method: 'POST', body, signal: chat.controller.signal });
      if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
      for await (const data of sseData(response)) {
        if (data === '[DONE]') break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || 'the stream failed');
        if (chunk.id && !answer.dataset.completionId) answer.dataset.completionId = chunk.id; // its history row's id
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          if (first === null) first = performance.now();
          text += delta;
          chunks += 1;
          answer.textContent = text;
          answer.dataset.chunks = String(chunks);
          answer.dataset.state = 'streaming';
          log.scrollTop = log.scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      answer.dataset.state = 'done';
      if (!text) answer.textContent = '(an empty answer)';
      chat.messages.push({ role: 'assistant', content: text });
      const ended = performance.now();
      const tokens = usage ? usage.completion_tokens : chunks;
      const decodeSeconds = first !== null && tokens > 1 ? (ended - first) / 1000 : null;
      $('#chat-stats').textContent = [
        `${tokens} tokens`,
        first !== null ? `first token after ${Math.round(first - started)} ms` : null,
        decodeSeconds ? `${fmtNumber((tokens - 1) / decodeSeconds)} tokens/s` : null,
        finish ? `finish: ${finish}` : null,
      ].filter(Boolean).join(' · ');
    } catch (e) {
      if (e.name === 'AbortError') {
        answer.dataset.state = 'stopped';
        if (text) chat.messages.push({ role: 'assistant', content: text });
        else chat.messages.pop(); // nothing came back: the question can be asked again
        $('#chat-stats').textContent = 'stopped';
      } else {
        answer.dataset.state = 'error';
        answer.classList.add('error');
        const why = e instanceof AuthError ? 'Sign in, then send again.' : e.message;
        answer.textContent = `${text ? text + '\n\n' : ''}${why}`;
        chat.messages.pop();
      }
    } finally {
      chat.controller = null;
      setChatBusy(false);
      kickHistory();
    }
  }

  $('#chat-form').addEventListener('submit', (event) => { event.preventDefault(); sendChat(); });
  $('#chat-input').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendChat();
    }
  });
  $('#chat-stop').addEventListener('click', () => { if (chat.controller) chat.controller.abort(); });
  $('#chat-clear').addEventListener('click', () => {
    if (chat.controller) chat.controller.abort();
    chat.messages = [];
    $('#chat-log').replaceChildren();
    $('#chat-stats').textContent = '';
  });

  start();
})();
