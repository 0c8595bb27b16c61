/*
 * eqx_explorer Explorer: one anywidget view (plain ES module, no build step, no framework).
 * All logic lives in Python (eqx_explorer/_widget.py); this file draws and forwards clicks.
 *
 * Stable hooks for browser tests:
 *   .eqxe-root                      the widget; .eqxe-stale once the spec changed after the
 *                                   last step (its badges are dimmed until the next report)
 *   .eqxe-header                    counts; [data-testid=trainable|total|pct|frozen|bytes|opt-state];
 *                                   [data-testid=lr-groups] (hidden while every trainable leaf has
 *                                   factor 1): .eqxe-lr-group[data-factor][data-group] per group
 *   .eqxe-banner                    error banner (hidden when empty); .eqxe-banner-text, .eqxe-banner-close
 *   .eqxe-expand-all, .eqxe-collapse-all
 *   .eqxe-legend-line               what a tick, ❄ and grey mean; .eqxe-wait ("waiting for the
 *                                   kernel…", shown while a message is unanswered)
 *   .eqxe-filter (search: FilterSpec's patterns), .eqxe-match-info ("N matches", "k of N
 *       matches"), .eqxe-freeze-matches, .eqxe-unfreeze-matches; matched rows have .eqxe-match,
 *       the one Enter jumped to .eqxe-current
 *   .eqxe-crumb                     the ancestors of the top row (.eqxe-crumb-key buttons)
 *   .eqxe-tree (focusable, the keyboard's rows: .eqxe-cursor) > .eqxe-rows (as high as every
 *       row whose ancestors are expanded); only the rows in view plus MARGIN_ROWS each side
 *       exist, placed at their offsets
 *   .eqxe-row[data-path][data-node][data-state=trainable|frozen|mixed|static|state][data-kind]
 *       A model state array (Explorer(..., state=)) is a row with data-kind=state and
 *       data-state=state under the layer that owns it, with no checkbox; the StateIndex markers
 *       it replaces are not rows.
 *       .eqxe-twisty (containers; aria-expanded), .eqxe-check (checked = trainable,
 *       indeterminate = mixed, disabled = static), .eqxe-name, .eqxe-cls, .eqxe-summary,
 *       .eqxe-params, .eqxe-sharding (only when the model has sharded arrays),
 *       .eqxe-badge[data-status=updated|stalled|frozen|leaked|kept|lost|unchanged] (after steps),
 *       .eqxe-rulecell: .eqxe-rule (the update rule's label, e.g. "interval[0, 1]"; hidden when
 *       none; its title explains the rule) and .eqxe-rule-menu (array rows; hidden on int/bool
 *       arrays; aria-expanded) that opens the picker. A constrained row has
 *       data-rule=positive|orthogonal|unit_norm|interval|custom. A collapsed container shows
 *       .eqxe-rule.eqxe-rule-inside ("2 rules") when leaves inside it have rules.
 *       Modules with a bool `inference` field (BatchNorm, Dropout) have .eqxe-mode ("eval", shown
 *       in inference mode; the row has data-mode=eval) and .eqxe-mode-menu that opens
 *       .eqxe-mode-pop[data-path]: .eqxe-mode-pick[data-on=true|false] (aria-pressed on the
 *       current mode) and .eqxe-mode-close; it closes once Python accepts.
 *       .eqxe-lrcell: .eqxe-lr (the learning-rate factor of the row's trainable leaves, "0.5",
 *       or a range "0.25–1"; data-group=0..5 colours a single factor by its group, in the order
 *       of counts.lr_groups; hidden while the spec has no groups) and .eqxe-lr-menu (rows with
 *       float arrays) that opens .eqxe-lr-pop[data-path]: .eqxe-lr-pick[data-factor] (aria-pressed
 *       on the row's factor), .eqxe-lr-factor (a number) and .eqxe-lr-set; on list and tuple
 *       rows also .eqxe-lr-decay (0.5) and .eqxe-lr-decay-apply ("Layer-wise decay"); it closes
 *       once Python accepts, an error stays in the banner.
 *   .eqxe-rule-pop[data-path]       the open rule picker, a panel right under its row:
 *       .eqxe-rule-pick[data-rule=none|positive|orthogonal|unit_norm] (aria-pressed on the
 *       current rule), .eqxe-rule-lo, .eqxe-rule-hi and .eqxe-rule-pick[data-rule=interval];
 *       .eqxe-rule-close (Escape closes it too). It closes once Python accepts the rule and
 *       stays open on an error (shown in the banner).
 *   .eqxe-style (code style select), .eqxe-code (pre), .eqxe-copy
 *   .eqxe-steps (only with a loss): .eqxe-method, .eqxe-step, .eqxe-n, .eqxe-run, .eqxe-reset,
 *       .eqxe-stop (shown while steps started from the page run), .eqxe-progress ("compiling…
 *       3.2 s", "step 40 / 100 · loss 0.52 · 1.9 s"; the root has .eqxe-busy meanwhile),
 *       .eqxe-step-info (the last call: "10 steps · 0.4 s", "stopped after 37 of 100 steps"),
 *       .eqxe-layout (what the runner compiles), .eqxe-status-counts (a badge per status with
 *       its count), .eqxe-notes (the report's notes, one li each; a long one shows its start
 *       and .eqxe-note-more, "show all"),
 *       .eqxe-loss (svg), .eqxe-legend
 *   .eqxe-detail                    the selected node; treescope renders in .eqxe-ts
 *
 * Rows: makeRow() builds the cells left to right and CSS `.eqxe-row` lays them out on a grid;
 * a new per-row marker (a per-leaf factor, say: one more bytes trait) is one more cell there
 * and one more grid column. The row menus' panels (.eqxe-pop) lie over the rows below theirs.
 */

const STATUS_TEXT = {
  updated: "trainable and changed by the step",
  stalled: "trainable but not changed (zero or missing gradient?)",
  frozen: "frozen and unchanged",
  leaked: "frozen but changed: the freeze leaked",
  kept: "not a trainable array; kept as it was",
  lost: "not a trainable array, and it did not survive the step",
  unchanged: "model state, bit-identical after the step",
};
// Model state (eqx.nn.State) is changed by its layer, not by the optimizer.
const STATE_STATUS_TEXT = {
  updated: "model state changed by the step (its layer updated it, e.g. running statistics)",
  unchanged: STATUS_TEXT.unchanged,
};
const MODE_TEXT =
  "inference mode: Dropout is off; BatchNorm normalises with its running statistics and does not update them";
const LAYOUT_TEXT = {
  masked: "masked layout: compiled once for every spec, method and N; optimizer state for every float leaf",
  structural: "structural layout: recompiles when the spec or method changes; optimizer state only for trainable leaves",
};
const RULE_TEXT = {
  none: "no rule: plain additive updates",
  positive: "trained in log space (p · exp(update)), so it stays > 0",
  orthogonal: "retracted onto orthogonal matrices (QR) after each update",
  unit_norm: "rescaled to norm 1 after each update",
  interval: "clipped into [lo, hi] after each update",
  custom: "a Python function rule(param, update) -> new param",
};
// Ranks for a container's badge: it shows the worst of its leaves when that is an alarm.
const SEVERITY = { kept: 0, frozen: 1, unchanged: 1, updated: 2, stalled: 3, leaked: 4, lost: 5 };
const ALARM = 4;
const NO_STATUS = 255;
const INITIAL_ROWS = 60;
// Virtual rows: every row is ROW_H pixels high, and only the rows in view plus MARGIN_ROWS
// on each side exist in the DOM.
const ROW_H = 22;
const MARGIN_ROWS = 40;
const TREE_H = 460; // the tree's height before it is laid out (CSS max-height)
const MAX_VALUE_PX = 420;
const WAIT_SHOW_MS = 400;
const NOTE_CHARS = 240;
const WAIT_LONG_MS = 8000;
// Learning-rate groups: colours (widget.css) cycle through this many; the menu's quick picks.
const LR_COLORS = 6;
const LR_PICKS = [1, 0.5, 0.1, 0.01];
const LR_DECAY = 0.5;

function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children) if (c != null) el.append(c);
  return el;
}

function bytesOf(b) {
  if (b instanceof ArrayBuffer) return new Uint8Array(b);
  return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
}

// Typed view over a copy (the copy is aligned, whatever the buffer's offset).
function typed(Type, b) {
  return new Type(bytesOf(b).slice().buffer);
}

const INTEGER = new Intl.NumberFormat("en-US");
const fmtInt = (x) => INTEGER.format(x);

function fmtBytes(x) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (x >= 1000 && i < units.length - 1) {
    x /= 1000;
    i += 1;
  }
  return `${i ? x.toFixed(x < 10 ? 2 : 1) : x} ${units[i]}`;
}

// Two significant digits, never rounding a small share to 0% or a large one to 100%:
// 0.034%, 3.4%, 34%, >99%.
function fmtPercent(p) {
  if (p === 0 || p === 100) return `${p}%`;
  if (p > 99) return ">99%";
  return `${Number(p.toPrecision(2)).toLocaleString("en-US", { maximumSignificantDigits: 2 })}%`;
}

const fmtSeconds = (s) => `${s < 1 ? s.toFixed(2) : s < 10 ? s.toFixed(1) : Math.round(s)} s`;

function progressText(p) {
  const elapsed = fmtSeconds(Math.max(0, (Date.now() - p.started) / 1000));
  const parts =
    p.phase === "running"
      ? [`step ${fmtInt(p.done)} / ${fmtInt(p.total)}`, p.loss === null ? null : `loss ${p.loss.toPrecision(4)}`, elapsed]
      : [`${p.phase}… ${elapsed}`];
  if (p.stopping) parts.push("stopping…");
  return parts.filter(Boolean).join(" · ");
}

const fmtNorm = (x) => (Number.isFinite(x) ? x.toPrecision(3) : "—");
const fmtNorms = ([g, u, d]) => `‖grad‖ ${fmtNorm(g)}  ‖update‖ ${fmtNorm(u)}  ‖change‖ ${fmtNorm(d)}`;
// A factor in at most three significant digits: 1, 0.5, 0.0859.
const fmtFactor = (f) => String(Number(f.toPrecision(3)));
const fmtRange = (lo, hi) => (lo === hi ? fmtFactor(lo) : `${fmtFactor(lo)}–${fmtFactor(hi)}`);

// Insert HTML so that its scripts run (innerHTML alone leaves them inert): treescope needs it.
function setHTML(el, html) {
  el.innerHTML = html;
  for (const old of el.querySelectorAll("script")) {
    const type = old.getAttribute("type");
    if (type && type !== "text/javascript" && type !== "module") continue;
    const fresh = document.createElement("script");
    for (const a of old.attributes) fresh.setAttribute(a.name, a.value);
    fresh.textContent = old.textContent;
    old.replaceWith(fresh);
  }
}

// treescope draws in shadow roots on a white box: put its figures on the theme's background
// (custom properties inherit into shadow trees; its own style comes later, hence !important).
const TREESCOPE_THEME = `.treescope_root { background-color: var(--eqxe-bg) !important;
  color: var(--eqxe-fg) !important; }`;
function themeTreescope(el) {
  for (const c of el.querySelectorAll("treescope-container")) {
    if (c.shadowRoot) c.shadowRoot.append(h("style", { text: TREESCOPE_THEME }));
  }
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = h("textarea", { class: "eqxe-offscreen" });
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

// The search pattern language of eqx_explorer/_select.py (`match_nodes`), run here so that
// typing answers at once: a node's path is that node; with `*`, a glob over keys (`*` within
// one key, `**` any number of keys, one key alone at any depth); other text matches every path
// containing it, ignoring case. "Freeze matches" sends the pattern to Python, which matches
// the same way.
const STARSTAR = null;
const MAX_PATTERN = 10_000; // as Python's cap on paths and patterns

// A test of one key's text against `text` with `*` wildcards, in one left-to-right pass (a
// regex `a.*b.*c` backtracks exponentially in the stars on a key that almost matches).
function wildcard(text) {
  const [first, ...rest] = text.split("*");
  if (!rest.length) return (key) => key === text;
  const last = rest.pop();
  return (key) => {
    const end = key.length - last.length;
    if (end < first.length || !key.startsWith(first) || !key.endsWith(last)) return false;
    let i = first.length;
    for (const part of rest) {
      i = key.indexOf(part, i);
      if (i < 0 || i + part.length > end) return false;
      i += part.length;
    }
    return true;
  };
}

function patternTokens(pattern) {
  const tokens = [];
  const n = pattern.length;
  let i = 0;
  while (i < n) {
    if (pattern[i] === ".") {
      i += 1;
      continue;
    }
    if (pattern.startsWith("**", i)) {
      tokens.push(STARSTAR);
      i += 2;
      continue;
    }
    let j = i;
    if (pattern[i] === "[") {
      // to the closing bracket, skipping quoted text
      let quote = null;
      for (j = i + 1; j < n && (quote || pattern[j] !== "]"); j++) {
        if ((pattern[j] === "'" || pattern[j] === '"') && (quote === null || quote === pattern[j])) {
          quote = quote ? null : pattern[j];
        }
      }
      j += 1;
    } else {
      while (j < n && pattern[j] !== "." && pattern[j] !== "[") j += 1;
    }
    tokens.push(wildcard(pattern.slice(i, j)));
    i = j;
  }
  if (tokens.length === 1 && tokens[0] !== STARSTAR) tokens.unshift(STARSTAR);
  return tokens;
}

// Every node (in tree order) whose keys match the glob: an NFA run down the tree, its states
// a bit mask per node (bit p: the first p tokens matched).
function globMatches(tree, pattern) {
  const tokens = patternTokens(pattern);
  const end = tokens.length;
  if (end > 30) return [];
  const closure = (mask) => {
    for (let p = 0; p < end; p++) if (mask & (1 << p) && tokens[p] === STARSTAR) mask |= 1 << (p + 1);
    return mask;
  };
  const { n, parent, step, hidden } = tree;
  const states = new Int32Array(n);
  states[0] = closure(1);
  const out = states[0] & (1 << end) ? [0] : [];
  for (let i = 1; i < n; i++) {
    const before = states[parent[i]];
    if (!before || hidden.has(i)) continue;
    const key = step[i].startsWith(".") ? step[i].slice(1) : step[i];
    let next = 0;
    for (let p = 0; p < end; p++) {
      if (!(before & (1 << p))) continue;
      if (tokens[p] === STARSTAR) next |= 1 << p;
      else if (tokens[p](key)) next |= 1 << (p + 1);
    }
    states[i] = next && closure(next);
    if (states[i] & (1 << end)) out.push(i);
  }
  return out;
}

function matchNodes(tree, pattern) {
  if (pattern.length > MAX_PATTERN) return [];
  const exact = tree.index.get(pattern);
  if (exact !== undefined) return [exact];
  if (pattern.includes("*")) return globMatches(tree, pattern);
  if (!tree.lower) tree.lower = tree.path.map((p) => p.toLowerCase());
  const needle = pattern.toLowerCase();
  const out = [];
  for (let i = 0; i < tree.n; i++) if (!tree.hidden.has(i) && tree.lower[i].includes(needle)) out.push(i);
  return out;
}

/**
 * The numeric columns of the node table (`_table_columns`): int32 parent, kind, class and
 * summary codes per model node, then float64 parameter counts; as plain arrays.
 */
function tableColumns(bytes, n) {
  const buffer = bytesOf(bytes).slice().buffer; // an aligned copy
  const row = (r) => Array.from(new Int32Array(buffer, 4 * r * n, n));
  const params = Array.from(new Float64Array(buffer, 16 * n, n));
  return { parent: row(0), kind: row(1), cls: row(2), summary: row(3), params };
}

/**
 * The rows from Python's columns: paths, depths, children and each row's slot in the status
 * buffers. Model nodes keep their index (0..table.n-1); the state arrays follow as rows
 * table.n.. under their layers; hidden nodes (StateIndex markers) get no parent link.
 */
function buildTree(text, columns, options) {
  const table = { ...text, ...tableColumns(columns, text.n) };
  const state = table.state;
  const n = table.n + state.parent.length;
  const kind = [...table.kind.map((k) => options.kinds[k]), ...state.parent.map(() => "state")];
  const parent = [...table.parent, ...state.parent];
  const step = [...table.step, ...state.step];
  const summary = [...table.summary, ...state.summary];
  const hidden = new Set(table.hidden);
  const path = new Array(n);
  const depth = new Int32Array(n);
  const children = Array.from({ length: n }, () => []);
  const leafOf = new Int32Array(n).fill(-1);
  let leaves = 0; // model leaves first, then state arrays: the order of the status buffers
  for (let i = 0; i < n; i++) {
    if (i === 0) path[0] = "";
    else {
      const p = parent[i];
      path[i] = path[p] + step[i];
      depth[i] = depth[p] + 1;
      if (!hidden.has(i)) children[p].push(i);
    }
    if (kind[i] === "array" || kind[i] === "leaf" || kind[i] === "state") leafOf[i] = leaves++;
  }
  const modal = new Set(table.inference);
  const index = new Map(path.map((p, i) => [p, i]));
  return { n, kind, parent, step, summary, path, depth, children, leafOf, leaves, modal, table, hidden, index };
}

class ExplorerView {
  constructor(model, el) {
    this.model = model;
    this.options = model.get("_options");
    this.tree = buildTree(model.get("_table"), model.get("_table_columns"), this.options);
    const { n, leaves } = this.tree;
    // Everything drawn comes from traits, so a saved notebook or an HTML export draws the
    // same state with no kernel: node state codes, and the last report's statuses and norms.
    this.states = typed(Uint8Array, model.get("_state_codes"));
    this.worst = new Uint8Array(n).fill(NO_STATUS);
    this.readReport();
    this.waiting = new Set(); // ids of messages not yet answered by the kernel
    this.rules = model.get("_constraints"); // {node: [rule name, label, (lo, hi)]}
    this.modes = model.get("_modes"); // {node: true} for modules in inference mode
    this.readFactors();
    this.pop = null; // the open row menu: {node, kind: "rule" | "mode" | "lr", el, picks}
    this.expanded = new Uint8Array(n);
    this.rows = new Map(); // node -> its row element, for the rows in the DOM only
    this.visible = []; // the nodes of the rows, in order, whose ancestors are expanded
    this.indexOf = new Int32Array(n).fill(-1); // node -> its position in `visible`
    this.cursor = 0; // the keyboard's row
    this.matches = []; // the search's matches, in tree order
    this.matchSet = new Set();
    this.current = -1; // the match Enter jumped to
    this.savedExpansion = null; // the user's expansion while a search shows its matches
    this.pending = new Map();
    this.listeners = [];
    this.sharded = Object.keys(this.tree.table.sharding).length > 0;

    this.root = h("div", { class: "eqxe-root" + (this.sharded ? " eqxe-sharded" : "") });
    el.append(this.root);
    this.buildHeader();
    this.buildBanner();
    const main = h("div", { class: "eqxe-main" });
    const side = h("div", { class: "eqxe-side" });
    main.append(this.buildTreePane(), side);
    side.append(this.buildCodePane());
    if (this.options.has_loss) side.append(this.buildStepPane());
    this.detailEl = h("div", { class: "eqxe-detail eqxe-pane" });
    side.append(this.detailEl);
    this.root.append(main);

    this.on("change:counts", () => {
      this.paintHeader();
      this.readGroups();
      for (const i of this.rows.keys()) this.paintLr(i);
    });
    this.on("change:_lr_factors", () => this.onFactors());
    this.on("change:error", () => this.paintBanner());
    this.on("change:code", () => this.paintCode());
    this.on("change:code_style", () => (this.styleSelect.value = model.get("code_style")));
    this.on("change:method", () => {
      if (this.methodSelect) this.methodSelect.value = model.get("method");
    });
    this.on("change:losses", () => this.paintLoss());
    this.on("change:detail", () => this.paintDetail());
    this.on("change:_constraints", () => this.onRules());
    this.on("change:_modes", () => this.onModes());
    this.on("change:progress", () => this.paintProgress());
    this.on("change:_state_codes", () => this.onStates());
    for (const name of ["_leaf_status", "_leaf_norms", "_last_run", "_stale"]) {
      this.on(`change:${name}`, () => this.scheduleReport());
    }
    this.on("msg:custom", (msg) => this.onMessage(msg));

    this.expandInitial();
    this.renderRows();
    this.paintHeader();
    this.paintBanner();
    this.paintCode();
    this.paintLoss();
    this.paintProgress();
    this.paintDetail();
    this.paintReport();
  }

  on(event, fn) {
    this.model.on(event, fn);
    this.listeners.push([event, fn]);
  }

  destroy() {
    for (const [event, fn] of this.listeners) this.model.off(event, fn);
    cancelAnimationFrame(this.searchFrame);
    cancelAnimationFrame(this.scrollFrame);
    clearTimeout(this.waitTimer);
    clearInterval(this.ticker);
  }

  // Every message carries an id that Python acknowledges; unanswered ones show "waiting".
  send(msg, onAck) {
    const id = 1 + Math.floor(Math.random() * 2 ** 31);
    if (onAck) this.pending.set(id, onAck);
    this.waiting.add(id);
    this.model.send({ ...msg, id });
    clearTimeout(this.waitTimer);
    this.waitTimer = setTimeout(() => this.paintWaiting(), WAIT_SHOW_MS);
  }

  onMessage(msg) {
    if (msg.type === "ack") {
      this.waiting.delete(msg.id);
      this.paintWaiting();
      const fn = this.pending.get(msg.id);
      if (fn) {
        this.pending.delete(msg.id);
        fn(msg.ok);
      }
    }
  }

  // The kernel is busy (running other cells) or gone (a saved page): say so after a moment.
  paintWaiting() {
    const waiting = this.waiting.size > 0;
    this.root.classList.toggle("eqxe-waiting", waiting);
    this.waitEl.hidden = !waiting;
    clearTimeout(this.waitTimer);
    if (!waiting) return;
    this.waitEl.textContent = "waiting for the kernel…";
    this.waitTimer = setTimeout(() => {
      this.waitEl.textContent =
        "waiting for the kernel… (no answer yet: it is busy, or not running and this view is read-only)";
    }, WAIT_LONG_MS);
  }

  onStates() {
    const start = performance.now();
    const old = this.states;
    this.states = typed(Uint8Array, this.model.get("_state_codes"));
    for (const i of this.rows.keys()) if (old[i] !== this.states[i]) this.paintRow(i);
    if (this.pop && this.pop.kind === "lr") this.paintPop(); // without groups, lrRange reads states
    performance.measure("eqxe:states", { start }); // read by benchmarks/bench_browser.py
  }

  // -- learning-rate factors: per leaf from `_lr_factors`, and the lowest and highest factor
  // of the trainable leaves under each node; none while every trainable leaf has factor 1 ----
  readFactors() {
    const { n, leafOf, children, kind } = this.tree;
    const bytes = this.model.get("_lr_factors");
    this.factors = bytes.byteLength ? typed(Float32Array, bytes) : null;
    this.readGroups();
    if (!this.factors) return; // a toggle then costs no pass over the nodes
    this.lrLo = new Float32Array(n).fill(Infinity);
    this.lrHi = new Float32Array(n).fill(-Infinity);
    for (let i = n - 1; i >= 0; i--) {
      const leaf = leafOf[i];
      if (leaf >= 0 && kind[i] !== "state" && this.factors[leaf] > 0) {
        this.lrLo[i] = this.lrHi[i] = this.factors[leaf];
      }
      for (const c of children[i]) {
        if (this.lrLo[c] < this.lrLo[i]) this.lrLo[i] = this.lrLo[c];
        if (this.lrHi[c] > this.lrHi[i]) this.lrHi[i] = this.lrHi[c];
      }
    }
  }

  // [lowest, highest] factor of the trainable leaves under node i; null when none trains.
  lrRange(i) {
    if (this.factors) return this.lrLo[i] <= this.lrHi[i] ? [this.lrLo[i], this.lrHi[i]] : null;
    const state = this.options.states[this.states[i]];
    return state === "trainable" || state === "mixed" ? [1, 1] : null;
  }

  // Group k of counts.lr_groups (largest factor first) colours its rows.
  readGroups() {
    const factors = Object.keys(this.model.get("counts").lr_groups || {}).map(Number);
    factors.sort((a, b) => b - a);
    this.groups = new Map(factors.map((f, k) => [Math.fround(f), k]));
  }

  onFactors() {
    this.readFactors();
    for (const i of this.rows.keys()) this.paintLr(i);
    if (this.pop) this.paintPop();
  }

  // Four traits change together at a report: paint once.
  scheduleReport() {
    if (this.reportQueued) return;
    this.reportQueued = true;
    queueMicrotask(() => {
      this.reportQueued = false;
      this.readReport();
      this.paintReport();
      for (const i of this.rows.keys()) this.paintRow(i);
    });
  }

  readReport() {
    const { n, leafOf, children, leaves } = this.tree;
    const status = this.model.get("_leaf_status");
    const norms = this.model.get("_leaf_norms");
    this.status = status.byteLength ? typed(Uint8Array, status) : new Uint8Array(leaves).fill(NO_STATUS);
    this.norms = norms.byteLength ? typed(Float32Array, norms) : new Float32Array(3 * leaves).fill(NaN);
    this.lastRun = this.model.get("_last_run");
    this.leafDetails = this.lastRun.details || {};
    const names = this.options.statuses;
    this.worst.fill(NO_STATUS);
    for (let i = n - 1; i >= 0; i--) {
      const leaf = leafOf[i];
      let w = NO_STATUS;
      if (leaf >= 0 && this.status[leaf] !== NO_STATUS) w = SEVERITY[names[this.status[leaf]]];
      for (const c of children[i]) {
        if (this.worst[c] !== NO_STATUS && (w === NO_STATUS || this.worst[c] > w)) w = this.worst[c];
      }
      this.worst[i] = w;
    }
  }

  paintReport() {
    // The badges describe the last step, taken under an earlier spec or method: dim them.
    this.root.classList.toggle("eqxe-stale", !!this.model.get("_stale"));
    if (this.stepInfo) this.paintRun(this.lastRun.run || {}, this.lastRun.notes || []);
  }

  // -- header and banner ------------------------------------------------------------
  buildHeader() {
    const part = (id) => h("span", { "data-testid": id });
    this.header = {
      trainable: part("trainable"),
      total: part("total"),
      pct: part("pct"),
      frozen: part("frozen"),
      bytes: part("bytes"),
      opt: part("opt-state"),
      lr: h("span", { class: "eqxe-lr-groups", "data-testid": "lr-groups" }),
    };
    const x = this.header;
    this.root.append(
      h(
        "div",
        { class: "eqxe-header" },
        h("span", { class: "eqxe-h-main" },
          "Trainable ", x.trainable, " / ", x.total, " params (", x.pct, ")"),
        h("span", {}, "frozen ", x.frozen),
        h("span", {}, "bytes ", x.bytes),
        x.opt,
        x.lr,
      ),
    );
    // On the legend's line, so that showing it moves nothing.
    this.waitEl = h("span", { class: "eqxe-wait", role: "status", hidden: "" });
    this.root.append(
      h(
        "div",
        { class: "eqxe-legend-line" },
        h("span", { class: "eqxe-key-tick", text: "☑" }),
        " ticked = trains · ",
        h("span", { class: "eqxe-key-frozen", text: "❄" }),
        " unticked = frozen · ",
        h("span", { class: "eqxe-key-grey", text: "grey" }),
        " = never trains (ints, bools, static fields, model state)",
        this.waitEl,
      ),
    );
  }

  paintHeader() {
    const c = this.model.get("counts");
    const x = this.header;
    x.trainable.textContent = fmtInt(c.trainable_params);
    x.total.textContent = fmtInt(c.total_params);
    const pct = c.total_params ? (100 * c.trainable_params) / c.total_params : NaN;
    x.pct.textContent = Number.isFinite(pct) ? fmtPercent(pct) : "—";
    x.frozen.textContent = fmtInt(c.frozen_params);
    x.bytes.textContent = `${fmtBytes(c.trainable_bytes)} trainable of ${fmtBytes(c.total_bytes)}`;
    x.opt.textContent = `optimizer state ≈ ${fmtBytes(c.opt_state_bytes)}`;
    x.opt.title = c.opt_state_note;
    // The learning-rate groups, largest factor first, once a factor other than 1 exists.
    const groups = Object.entries(c.lr_groups || {})
      .map(([f, g]) => [Number(f), g])
      .sort((a, b) => b[0] - a[0]);
    x.lr.hidden = !groups.some(([f]) => f !== 1);
    x.lr.replaceChildren(
      ...(x.lr.hidden ? [] : ["lr groups "]),
      ...groups.map(([f, g], k) =>
        h("span", {
          class: "eqxe-lr-group",
          "data-factor": String(f),
          "data-group": String(k % LR_COLORS),
          text: `×${fmtFactor(f)}: ${fmtInt(g.params)}`,
          title: `learning rate × ${f}: ${fmtInt(g.params)} params in ${fmtInt(g.leaves)} leaves`,
        }),
      ),
    );
  }

  buildBanner() {
    this.bannerText = h("span", { class: "eqxe-banner-text" });
    this.banner = h(
      "div",
      { class: "eqxe-banner", role: "alert" },
      this.bannerText,
      h("button", {
        class: "eqxe-banner-close",
        title: "Dismiss",
        text: "×",
        onclick: () => this.send({ type: "dismiss" }),
      }),
    );
    this.root.append(this.banner);
  }

  paintBanner() {
    const text = this.model.get("error");
    this.bannerText.textContent = text;
    this.banner.hidden = !text;
  }

  // -- tree pane --------------------------------------------------------------------
  buildTreePane() {
    this.filter = h("input", {
      class: "eqxe-filter",
      type: "search",
      placeholder: "search: attn, norm*, blocks[*].mlp, **.bias",
      "aria-label": "search paths",
      title: "text: paths containing it (any case); * any text within a key; ** any keys. Enter: next match, Shift+Enter: previous",
    });
    this.filter.addEventListener("input", () => {
      cancelAnimationFrame(this.searchFrame);
      this.searchFrame = requestAnimationFrame(() => this.search());
    });
    this.filter.addEventListener("keydown", (e) => {
      if (e.key !== "Enter") return;
      e.preventDefault();
      cancelAnimationFrame(this.searchFrame);
      if (this.filter.value.trim() !== this.searched) this.search();
      this.jump(e.shiftKey ? -1 : 1);
    });
    this.matchInfo = h("span", { class: "eqxe-match-info", role: "status" });
    const glob = (action) => () => {
      const pattern = this.filter.value.trim();
      if (pattern) this.send({ type: "glob", pattern, action });
    };
    const toolbar = h(
      "div",
      { class: "eqxe-toolbar" },
      h("button", { class: "eqxe-expand-all", text: "Expand all", onclick: () => this.expandAll(true) }),
      h("button", { class: "eqxe-collapse-all", text: "Collapse all", onclick: () => this.expandAll(false) }),
      this.filter,
      h("button", { class: "eqxe-freeze-matches", text: "Freeze matches", onclick: glob("freeze") }),
      h("button", { class: "eqxe-unfreeze-matches", text: "Unfreeze matches", onclick: glob("unfreeze") }),
    );
    const columns = h(
      "div",
      { class: "eqxe-row eqxe-columns" },
      h("span", { class: "eqxe-namecell", text: "name" }),
      h("span", { text: "class" }),
      h("span", { text: "value" }),
      h("span", { class: "eqxe-params", text: "params" }),
      this.sharded ? h("span", { class: "eqxe-sharding", text: "sharding" }) : null,
      h("span", { class: "eqxe-rulecell", text: "rule / mode" }),
      h("span", { class: "eqxe-lrcell", text: "lr ×", title: "learning-rate factor (0 = frozen)" }),
      h("span", { text: "" }),
    );
    this.crumb = h("div", { class: "eqxe-crumb", "aria-label": "ancestors of the top row" });
    this.rowsEl = h("div", { class: "eqxe-rows" });
    this.treeEl = h(
      "div",
      { class: "eqxe-tree", role: "tree", tabindex: "0", "aria-label": "model tree" },
      this.rowsEl,
    );
    this.treeEl.addEventListener("click", (e) => this.onTreeClick(e));
    this.treeEl.addEventListener("keydown", (e) => this.onTreeKey(e));
    this.treeEl.addEventListener("scroll", () => {
      if (this.scrollFrame) return;
      this.scrollFrame = requestAnimationFrame(() => {
        this.scrollFrame = 0;
        this.paintWindow(false);
      });
    });
    return h("div", { class: "eqxe-pane eqxe-tree-pane" }, toolbar, this.matchInfo, columns, this.crumb, this.treeEl);
  }

  isContainer(i) {
    return this.tree.children[i].length > 0;
  }

  expandInitial() {
    // Breadth-first while the visible rows stay few: the first levels of a big model.
    const { children } = this.tree;
    this.expanded[0] = 1;
    let visible = 1 + children[0].length;
    let level = children[0].slice();
    while (level.length) {
      const next = [];
      for (const i of level) {
        if (!this.isContainer(i) || visible + children[i].length > INITIAL_ROWS) continue;
        this.expanded[i] = 1;
        visible += children[i].length;
        next.push(...children[i]);
      }
      level = next;
    }
  }

  expandAll(open) {
    const { n } = this.tree;
    for (let i = 0; i < n; i++) this.expanded[i] = open && this.isContainer(i) ? 1 : 0;
    this.expanded[0] = 1;
    this.renderRows();
  }

  // The model of rows: which nodes show, in order. Only `paintWindow` touches the DOM.
  renderRows() {
    const { children } = this.tree;
    const visible = [];
    const stack = [0];
    while (stack.length) {
      const i = stack.pop();
      visible.push(i);
      if (this.expanded[i]) for (let j = children[i].length - 1; j >= 0; j--) stack.push(children[i][j]);
    }
    this.indexOf.fill(-1);
    for (let k = 0; k < visible.length; k++) this.indexOf[visible[k]] = k;
    this.visible = visible;
    this.rowsEl.style.height = `${visible.length * ROW_H}px`;
    // A shorter list (a collapse, a cleared search) can leave the scroll past its end until
    // the browser clamps it after layout: painted at that scroll, the frame has no rows.
    const end = Math.max(0, visible.length * ROW_H - (this.treeEl.clientHeight || TREE_H));
    if (this.treeEl.scrollTop > end) this.treeEl.scrollTop = end;
    this.paintWindow(true);
  }

  // The rows in view plus a margin: rows leaving it are dropped, rows entering it are built.
  paintWindow(repaint) {
    const top = this.treeEl.scrollTop;
    const height = this.treeEl.clientHeight || TREE_H;
    const first = Math.max(0, Math.floor(top / ROW_H) - MARGIN_ROWS);
    const last = Math.min(this.visible.length, Math.ceil((top + height) / ROW_H) + MARGIN_ROWS);
    for (const [i, row] of this.rows) {
      const k = this.indexOf[i];
      if (k < first || k >= last) {
        row.remove();
        this.rows.delete(i);
      }
    }
    const fresh = document.createDocumentFragment();
    for (let k = first; k < last; k++) {
      const i = this.visible[k];
      let row = this.rows.get(i);
      if (!row) {
        row = this.makeRow(i);
        this.rows.set(i, row);
        fresh.append(row);
        this.paintRow(i);
      } else if (repaint) {
        this.paintRow(i);
      }
      if (row._eqxeAt !== k) {
        row.style.top = `${k * ROW_H}px`;
        row._eqxeAt = k;
      }
    }
    this.rowsEl.append(fresh);
    if (this.pop) {
      const k = this.indexOf[this.pop.node];
      if (this.rows.has(this.pop.node)) this.pop.el.style.top = `${(k + 1) * ROW_H}px`;
      else this.closePop(false);
    }
    if (!this.columnsFit && this.root.isConnected && this.rows.size) this.fitColumns();
    this.paintCrumb(top); // the offset read before the rows changed: no forced layout
    this.paintSelected();
  }

  // Shapes, dtypes and counts are never cut: their columns are as wide as their longest text.
  fitColumns() {
    const row = this.rows.values().next().value;
    const ctx = document.createElement("canvas").getContext("2d");
    const widest = (el, texts) => {
      const style = getComputedStyle(el);
      ctx.font = `${style.fontStyle} ${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
      let w = 0;
      for (const t of texts) w = Math.max(w, ctx.measureText(t).width);
      return Math.ceil(w) + 8;
    };
    const { table, children } = this.tree;
    const kids = Math.max(...children.map((c) => c.length));
    const value = widest(row.querySelector(".eqxe-summary"), [...table.summaries, `${kids} children`, "value"]);
    const params = widest(row.querySelector(".eqxe-params"), [fmtInt(Math.max(...table.params)), "params"]);
    this.root.style.setProperty("--eqxe-w-value", `${Math.min(value, MAX_VALUE_PX)}px`);
    this.root.style.setProperty("--eqxe-w-params", `${params}px`);
    this.columnsFit = true;
  }

  // The ancestors of the row at the top of the view, so that a deep row is never anonymous.
  paintCrumb(top) {
    const k = Math.min(this.visible.length - 1, Math.floor(top / ROW_H));
    const { parent, path } = this.tree;
    const chain = [];
    for (let p = parent[this.visible[Math.max(0, k)]]; p > 0; p = parent[p]) chain.push(p);
    chain.reverse();
    const key = chain.join(",");
    if (key === this.crumbKey) return;
    this.crumbKey = key;
    this.crumb.replaceChildren(
      ...chain.flatMap((p, j) => [
        ...(j ? [h("span", { class: "eqxe-crumb-sep", text: " › " })] : []),
        h("button", { class: "eqxe-crumb-key", text: this.label(p), title: path[p], onclick: () => this.reveal(p, true) }),
      ]),
    );
  }

  label(i) {
    return i === 0 ? "(root)" : this.tree.step[i].replace(/^\./, "");
  }

  // Expand the ancestors of node `i` and scroll its row into view (to the top with `atTop`).
  reveal(i, atTop = false) {
    let opened = false;
    for (let p = this.tree.parent[i]; p >= 0; p = this.tree.parent[p]) {
      if (!this.expanded[p]) opened = this.expanded[p] = 1;
    }
    if (opened) this.renderRows();
    const y = this.indexOf[i] * ROW_H;
    const view = this.treeEl.clientHeight || TREE_H;
    const top = this.treeEl.scrollTop;
    if (atTop) this.treeEl.scrollTop = y;
    else if (y < top || y + ROW_H > top + view) this.treeEl.scrollTop = Math.max(0, y - Math.floor(view / 3));
    this.paintWindow(false);
  }

  // -- search: matched here (see matchNodes); the user's expansion comes back when cleared ----
  search() {
    const pattern = this.filter.value.trim();
    this.searched = pattern;
    const before = [...this.matchSet];
    this.current = -1;
    if (!pattern) {
      this.matches = [];
      this.matchSet = new Set();
      this.matchInfo.textContent = "";
      if (this.savedExpansion) {
        this.expanded = this.savedExpansion;
        this.savedExpansion = null;
      }
      this.renderRows();
      return;
    }
    if (!this.savedExpansion) this.savedExpansion = this.expanded.slice();
    this.matches = matchNodes(this.tree, pattern);
    this.matchSet = new Set(this.matches);
    // Show every match: the user's expansion plus the ancestors of the matches.
    this.expanded = this.savedExpansion.slice();
    const seen = new Uint8Array(this.tree.n);
    for (const i of this.matches) {
      for (let p = this.tree.parent[i]; p >= 0 && !seen[p]; p = this.tree.parent[p]) {
        seen[p] = 1;
        this.expanded[p] = 1;
      }
    }
    this.paintMatchInfo();
    for (const i of before) if (this.rows.has(i)) this.paintRow(i);
    this.renderRows();
    if (this.matches.length) this.reveal(this.matches[0]);
  }

  jump(direction) {
    const count = this.matches.length;
    if (!count) return;
    const old = this.matches[this.current];
    this.current = this.current < 0 && direction < 0 ? count - 1 : (this.current + direction + count) % count;
    const i = this.matches[this.current];
    this.cursor = i;
    this.reveal(i);
    for (const j of [old, i]) if (this.rows.has(j)) this.paintRow(j);
    this.paintMatchInfo();
  }

  paintMatchInfo() {
    const count = this.matches.length;
    const which = this.current >= 0 ? `${fmtInt(this.current + 1)} of ` : "";
    this.matchInfo.textContent = count
      ? `${which}${fmtInt(count)} match${count === 1 ? "" : "es"} · Enter: next, Shift+Enter: previous`
      : "no match";
  }

  // -- keyboard: arrows move, space toggles, left / right collapse / expand ---------------------
  onTreeKey(e) {
    if (e.target.closest(".eqxe-pop")) return;
    const { parent } = this.tree;
    let i = this.cursor;
    while (this.indexOf[i] < 0) i = parent[i]; // its row was collapsed away
    const k = this.indexOf[i];
    const open = this.isContainer(i) && this.expanded[i];
    if (e.key === "ArrowDown") this.moveCursor(k + 1);
    else if (e.key === "ArrowUp") this.moveCursor(k - 1);
    else if (e.key === "Home") this.moveCursor(0);
    else if (e.key === "End") this.moveCursor(this.visible.length - 1);
    else if (e.key === "ArrowRight" && this.isContainer(i) && !open) this.setExpanded(i, 1);
    else if (e.key === "ArrowRight") this.moveCursor(open ? k + 1 : k);
    else if (e.key === "ArrowLeft" && open && i !== 0) this.setExpanded(i, 0);
    else if (e.key === "ArrowLeft") this.moveCursor(i ? this.indexOf[parent[i]] : 0);
    else if (e.key === " ") this.toggle(i);
    else if (e.key === "Enter") this.send({ type: "select", path: this.tree.path[i] });
    else return;
    e.preventDefault();
  }

  moveCursor(k) {
    const old = this.cursor;
    this.cursor = this.visible[Math.max(0, Math.min(this.visible.length - 1, k))];
    if (this.rows.has(old)) this.paintRow(old);
    this.reveal(this.cursor);
    if (this.rows.has(this.cursor)) this.paintRow(this.cursor);
  }

  setExpanded(i, open) {
    this.cursor = i;
    this.expanded[i] = open;
    this.renderRows();
  }

  // Python decides: a checkbox shows the new state once its trait arrives.
  toggle(i) {
    const state = this.tree.kind[i] === "state" ? "state" : this.options.states[this.states[i]];
    if (state === "static" || state === "state") return;
    this.send({ type: "toggle", path: this.tree.path[i], frozen: state === "trainable" });
  }

  makeRow(i) {
    const { kind, path, depth, step, table } = this.tree;
    const container = this.isContainer(i);
    const isState = kind[i] === "state";
    const label = this.label(i);
    const cls = isState ? "State" : table.classes[table.cls[i]];
    const kids = this.tree.children[i].length;
    const summary = container ? `${kids} children` : table.summaries[this.tree.summary[i]];
    const sharding = table.sharding[i] || "";
    const staticText = table.static[i];
    const params = !isState && table.params[i];
    const clsText = staticText ? `${cls}(${staticText})` : cls;
    const row = h("div", {
      class: "eqxe-row",
      role: "treeitem",
      "data-node": String(i),
      "data-path": path[i],
      "data-kind": kind[i],
      "aria-level": String(depth[i] + 1),
    });
    row.style.setProperty("--depth", depth[i]);
    const twisty = container
      ? h("button", { class: "eqxe-twisty", "aria-label": "expand" })
      : h("span", { class: "eqxe-twisty eqxe-twisty-leaf" });
    // A state array is not a parameter: no checkbox, a blank of the same width.
    const check = isState
      ? h("span", { class: "eqxe-check eqxe-no-check" })
      : h("input", { class: "eqxe-check", type: "checkbox" });
    const badge = h("span", { class: "eqxe-badge" });
    const mode = this.tree.modal.has(i)
      ? {
          pill: h("span", { class: "eqxe-mode", text: "eval", title: MODE_TEXT }),
          menu: h("button", {
            class: "eqxe-mode-menu",
            text: "⋯",
            title: "inference mode…",
            "aria-label": `inference mode of ${path[i] || "(root)"}`,
            "aria-haspopup": "true",
            "aria-expanded": "false",
          }),
        }
      : null;
    const rule =
      kind[i] === "array"
        ? {
            pill: h("span", { class: "eqxe-rule" }),
            menu: h("button", {
              class: "eqxe-rule-menu",
              text: "⋯",
              title: "update rule…",
              "aria-label": `update rule of ${path[i] || "(root)"}`,
              "aria-haspopup": "true",
              "aria-expanded": "false",
            }),
          }
        : container
          ? { pill: h("span", { class: "eqxe-rule eqxe-rule-inside" }), menu: null }
          : null;
    // Rows with float arrays take a learning-rate factor (static rows stay static).
    const lr = isState
      ? null
      : {
          pill: h("span", { class: "eqxe-lr" }),
          menu:
            this.options.states[this.states[i]] === "static"
              ? null
              : h("button", {
                  class: "eqxe-lr-menu",
                  text: "⋯",
                  title: "learning-rate factor…",
                  "aria-label": `learning-rate factor of ${path[i] || "(root)"}`,
                  "aria-haspopup": "true",
                  "aria-expanded": "false",
                }),
        };
    row.append(
      ...[
        h("span", { class: "eqxe-namecell" }, twisty, check, h("span", { class: "eqxe-name", text: label })),
      h("span", { class: "eqxe-cls", text: clsText, title: clsText }),
      h("span", { class: "eqxe-summary", text: summary }),
      h("span", { class: "eqxe-params", text: params ? fmtInt(params) : "" }),
        this.sharded ? h("span", { class: "eqxe-sharding", text: sharding }) : null,
        h(
          "span",
          { class: "eqxe-rulecell" },
          rule && rule.pill,
          rule && rule.menu,
          mode && mode.pill,
          mode && mode.menu,
        ),
        h("span", { class: "eqxe-lrcell" }, lr && lr.pill, lr && lr.menu),
        badge,
      ].filter(Boolean),
    );
    const what = isState && "model state (eqx.nn.State): its layer updates it, the optimizer does not";
    row.title = [path[i] || "(root)", cls, summary, sharding && `sharding: ${sharding}`, what]
      .filter(Boolean)
      .join("\n");
    row._eqxe = { twisty, check, badge, container, rule, mode, lr };
    return row;
  }

  paintRow(i) {
    const row = this.rows.get(i);
    const { twisty, check, badge, container, rule, mode } = row._eqxe;
    const names = this.options.states;
    const isState = this.tree.kind[i] === "state";
    const state = isState ? "state" : names[this.states[i]];
    row.dataset.state = state;
    if (!isState) {
      check.checked = state === "trainable";
      check.indeterminate = state === "mixed";
      check.disabled = state === "static";
      check.title =
        state === "static"
          ? "not trainable: no float array here"
          : state === "mixed"
            ? "mixed: click to make all trainable"
            : state === "trainable"
              ? "trainable: click to freeze"
              : "frozen: click to unfreeze";
    }
    if (container) {
      const open = !!this.expanded[i];
      twisty.textContent = open ? "▾" : "▸";
      twisty.setAttribute("aria-expanded", String(open));
    }
    row.classList.toggle("eqxe-match", this.matchSet.has(i));
    row.classList.toggle("eqxe-current", this.matches[this.current] === i);
    row.classList.toggle("eqxe-cursor", this.cursor === i);
    this.paintBadge(i, badge);
    if (rule) this.paintRule(i, row, rule, state);
    this.paintLr(i);
    if (mode) {
      const on = !!this.modes[i];
      if (on) row.dataset.mode = "eval";
      else delete row.dataset.mode;
      mode.pill.hidden = !on;
    }
  }

  paintRule(i, row, { pill, menu }, state) {
    if (!menu) {
      // A container shows how many rules its collapsed sub-tree hides.
      const inside = this.expanded[i] ? 0 : this.rulesInside().get(i) || 0;
      pill.hidden = !inside;
      pill.textContent = inside ? `${inside} rule${inside > 1 ? "s" : ""}` : "";
      pill.title = inside ? "update rules on leaves inside: expand to see them" : "";
      return;
    }
    const r = this.rules[i];
    if (r) row.dataset.rule = r[0];
    else delete row.dataset.rule;
    pill.hidden = !r;
    pill.textContent = r ? r[1] : "";
    pill.title = r ? `update rule ${r[1]}: ${RULE_TEXT[r[0]]}` : "";
    // Only float arrays take a rule; "static" is an int/bool array.
    menu.hidden = state === "static";
  }

  // The factor of the row's trainable leaves, coloured by its group; a range has no group.
  paintLr(i) {
    const { lr } = this.rows.get(i)._eqxe;
    if (!lr) return;
    const range = this.factors && this.lrRange(i);
    const show = !!range;
    const [lo, hi] = range || [0, 0];
    lr.pill.hidden = !show;
    lr.pill.textContent = show ? fmtRange(lo, hi) : "";
    const group = show && lo === hi ? this.groups.get(lo) : undefined;
    if (group === undefined) delete lr.pill.dataset.group;
    else lr.pill.dataset.group = String(group % LR_COLORS);
    lr.pill.title = !show
      ? ""
      : lo === hi
        ? `trains at ${fmtFactor(lo)} × the learning rate`
        : `its trainable leaves train at ${fmtRange(lo, hi)} × the learning rate`;
  }

  rulesInside() {
    // Counts of constrained leaves under each container, recomputed when the rules change.
    if (!this.insideCache) {
      this.insideCache = new Map();
      const parent = this.tree.parent;
      for (const k of Object.keys(this.rules)) {
        for (let p = parent[Number(k)]; p >= 0; p = parent[p]) {
          this.insideCache.set(p, (this.insideCache.get(p) || 0) + 1);
        }
      }
    }
    return this.insideCache;
  }

  onRules() {
    const old = this.rules;
    this.rules = this.model.get("_constraints");
    const before = this.rulesInside();
    this.insideCache = null;
    for (const k of new Set([...before.keys(), ...this.rulesInside().keys()])) {
      if (this.rows.has(k)) this.paintRow(k);
    }
    for (const k of new Set([...Object.keys(old), ...Object.keys(this.rules)])) {
      if (this.rows.has(Number(k))) this.paintRow(Number(k));
    }
    if (this.pop) this.paintPop();
  }

  onModes() {
    const old = this.modes;
    this.modes = this.model.get("_modes");
    for (const k of new Set([...Object.keys(old), ...Object.keys(this.modes)])) {
      if (this.rows.has(Number(k))) this.paintRow(Number(k));
    }
    if (this.pop) this.paintPop();
  }

  // -- row menus: a panel right under the row whose menu button was clicked ----------------
  // kind "rule": an array's update rule; kind "mode": a module's inference mode.
  openPop(i, kind) {
    this.closePop(false);
    const picker = { rule: this.rulePicker, mode: this.modePicker, lr: this.lrPicker }[kind];
    const { el, picks } = picker.call(this, i);
    el.style.setProperty("--depth", this.tree.depth[i]);
    el.addEventListener("keydown", (e) => {
      if (e.key === "Escape") {
        e.stopPropagation();
        this.closePop(true);
      }
    });
    const row = this.rows.get(i);
    row._eqxe[kind].menu.setAttribute("aria-expanded", "true");
    el.style.top = `${(this.indexOf[i] + 1) * ROW_H}px`; // over the rows below, which keep their places
    this.rowsEl.append(el);
    el.scrollIntoView({ block: "nearest" });
    this.pop = { node: i, kind, el, picks };
    this.paintPop();
    (picks.find((b) => b.getAttribute("aria-pressed") === "true") || picks[0]).focus();
  }

  // Send a menu's choice; the panel closes once Python accepts it (an error stays in the banner).
  choose(i, kind, msg) {
    this.send(msg, (ok) => {
      if (ok && this.pop && this.pop.node === i && this.pop.kind === kind) this.closePop(true);
    });
  }

  popPanel(i, kind, title, ...content) {
    const path = this.tree.path[i];
    return h(
      "div",
      {
        class: `eqxe-pop eqxe-${kind}-pop`,
        role: "group",
        "aria-label": `${title} of ${path || "(root)"}`,
        "data-path": path,
      },
      h("span", { class: "eqxe-pop-title", text: title }),
      ...content,
      h("button", { class: `eqxe-pop-close eqxe-${kind}-close`, text: "×", title: "close", onclick: () => this.closePop(true) }),
    );
  }

  rulePicker(i) {
    const path = this.tree.path[i];
    const pick = (rule) => this.choose(i, "rule", { type: "constrain", path, rule });
    const picks = ["none", ...this.options.rules.filter((r) => r !== "interval")].map((r) =>
      h("button", { class: "eqxe-rule-pick", "data-rule": r, text: r, title: RULE_TEXT[r], onclick: () => pick(r) }),
    );
    const current = this.rules[i];
    const bound = (cls, name, value) =>
      h("input", { class: cls, type: "number", step: "any", value, "aria-label": name, title: name });
    const [a, b] = current && current[0] === "interval" ? current.slice(2) : [0, 1];
    const lo = bound("eqxe-rule-lo", "lo", a ?? "");
    const hi = bound("eqxe-rule-hi", "hi", b ?? "");
    const interval = h("button", {
      class: "eqxe-rule-pick",
      "data-rule": "interval",
      text: "interval",
      title: RULE_TEXT.interval,
      onclick: () => {
        const a = lo.valueAsNumber;
        const b = hi.valueAsNumber;
        lo.classList.toggle("eqxe-invalid", !Number.isFinite(a));
        hi.classList.toggle("eqxe-invalid", !Number.isFinite(b));
        if (Number.isFinite(a) && Number.isFinite(b)) pick(["interval", a, b]);
      },
    });
    const el = this.popPanel(
      i,
      "rule",
      "update rule",
      ...picks,
      h("span", { class: "eqxe-rule-interval" }, interval, " [", lo, ", ", hi, "]"),
    );
    el.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.target === lo || e.target === hi)) interval.click();
    });
    return { el, picks: [...picks, interval] };
  }

  modePicker(i) {
    const path = this.tree.path[i];
    const picks = [
      [true, "on (eval)", MODE_TEXT],
      [false, "off (training)", "training mode: the layer as the model has it in training"],
    ].map(([on, text, title]) =>
      h("button", {
        class: "eqxe-mode-pick",
        "data-on": String(on),
        text,
        title,
        onclick: () => this.choose(i, "mode", { type: "inference", path, on }),
      }),
    );
    return { el: this.popPanel(i, "mode", "inference mode", ...picks), picks };
  }

  // A factor for the node (LR_PICKS or a typed one) and, on lists, layer-wise decay.
  lrPicker(i) {
    const path = this.tree.path[i];
    const scale = (factor) => this.choose(i, "lr", { type: "scale_lr", path, factor });
    // A number input's value is "" when its text is not a number: Python says why in the banner.
    const number = (input) => (Number.isFinite(input.valueAsNumber) ? input.valueAsNumber : input.value);
    const picks = LR_PICKS.map((f) =>
      h("button", { class: "eqxe-lr-pick", "data-factor": String(f), text: `×${f}`, onclick: () => scale(f) }),
    );
    const field = (cls, name, value) =>
      h("input", { class: cls, type: "number", step: "any", min: "0", value, "aria-label": name, title: name });
    const range = this.lrRange(i);
    const single = range && range[0] === range[1];
    const factor = field("eqxe-lr-factor", "factor", single ? fmtFactor(range[0]) : "1");
    const set = h("button", { class: "eqxe-lr-set", text: "set", onclick: () => scale(number(factor)) });
    const content = [...picks, h("span", { class: "eqxe-lr-custom" }, "× ", factor, " ", set)];
    let decay = null;
    let apply = null;
    if (this.tree.kind[i] === "list" || this.tree.kind[i] === "tuple") {
      decay = field("eqxe-lr-decay", "decay", String(LR_DECAY));
      apply = h("button", {
        class: "eqxe-lr-decay-apply",
        text: "Layer-wise decay",
        title: "the last layer trains at 1×, the one before at decay×, then decay²×, …",
        onclick: () => this.choose(i, "lr", { type: "layerwise_decay", path, decay: number(decay) }),
      });
      content.push(h("span", { class: "eqxe-lr-llrd" }, apply, " ", decay));
    }
    const el = this.popPanel(i, "lr", "learning rate", ...content);
    el.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && e.target === factor) set.click();
      if (e.key === "Enter" && e.target === decay) apply.click();
    });
    return { el, picks: [...picks, set, ...(apply ? [apply] : [])] };
  }

  paintPop() {
    const { node, kind, picks } = this.pop;
    if (kind === "lr") {
      const range = this.lrRange(node);
      for (const b of picks) {
        if (!b.dataset.factor) continue;
        const f = Math.fround(Number(b.dataset.factor));
        const on = !!range && range[0] === range[1] && f === range[0];
        b.setAttribute("aria-pressed", String(on));
      }
      return;
    }
    const current =
      kind === "rule" ? (this.rules[node] ? this.rules[node][0] : "none") : String(!!this.modes[node]);
    for (const b of picks) {
      const value = kind === "rule" ? b.dataset.rule : b.dataset.on;
      b.setAttribute("aria-pressed", String(value === current));
    }
  }

  closePop(refocus) {
    if (!this.pop) return;
    const { node, kind, el } = this.pop;
    this.pop = null;
    el.remove();
    const row = this.rows.get(node);
    if (row) {
      const menu = row._eqxe[kind].menu;
      menu.setAttribute("aria-expanded", "false");
      if (refocus && row.isConnected) menu.focus();
    }
  }

  statusText(i, status) {
    return (this.tree.kind[i] === "state" ? STATE_STATUS_TEXT : STATUS_TEXT)[status];
  }

  paintBadge(i, badge) {
    const { leafOf } = this.tree;
    const names = this.options.statuses;
    const leaf = leafOf[i];
    let status = null;
    let title = "";
    if (leaf >= 0 && this.status[leaf] !== NO_STATUS) {
      status = names[this.status[leaf]];
      const norms = [0, 1, 2, 3].map((r) => this.norms[r * this.tree.leaves + leaf]);
      const note = this.leafDetails[leaf] ? `\n${this.leafDetails[leaf]}` : "";
      const lr = Number.isNaN(norms[3]) ? "" : `lr × ${fmtFactor(norms[3])}  `;
      title = `${status}: ${this.statusText(i, status)}\n${lr}${fmtNorms(norms)}${note}`;
    } else if (leaf < 0 && this.worst[i] !== NO_STATUS && this.worst[i] >= ALARM) {
      status = Object.keys(SEVERITY).find((k) => SEVERITY[k] === this.worst[i]);
      title = `contains ${status} leaves: expand to see which`;
    }
    if (status && this.root.classList.contains("eqxe-stale")) {
      title += "\n(from the last step, before the spec changed: press Step to refresh)";
    }
    badge.hidden = !status;
    badge.textContent = status || "";
    badge.dataset.status = status || "";
    badge.title = title;
  }

  onTreeClick(e) {
    const row = e.target.closest(".eqxe-row");
    if (!row || !this.treeEl.contains(row)) return;
    const i = Number(row.dataset.node);
    const old = this.cursor;
    this.cursor = i;
    if (old !== i && this.rows.has(old)) this.paintRow(old);
    this.treeEl.focus({ preventScroll: true }); // the keys act from the clicked row on
    const menu = ["rule", "mode", "lr"].find((k) => e.target.classList.contains(`eqxe-${k}-menu`));
    if (menu) {
      if (this.pop && this.pop.node === i && this.pop.kind === menu) this.closePop(true);
      else this.openPop(i, menu);
    } else if (e.target.classList.contains("eqxe-twisty") && this.isContainer(i)) {
      this.expanded[i] = this.expanded[i] ? 0 : 1;
      this.renderRows();
    } else if (e.target.classList.contains("eqxe-check")) {
      e.preventDefault(); // the box keeps its state until Python's arrives
      this.toggle(i);
    } else {
      this.send({ type: "select", path: this.tree.path[i] });
    }
  }

  paintSelected() {
    for (const row of this.treeEl.querySelectorAll(".eqxe-selected")) row.classList.remove("eqxe-selected");
    const d = this.model.get("detail");
    if (!("path" in d)) return;
    const row = this.treeEl.querySelector(`.eqxe-row[data-path="${CSS.escape(d.path)}"]`);
    if (row) row.classList.add("eqxe-selected");
  }

  // -- code pane ---------------------------------------------------------------------
  buildCodePane() {
    this.styleSelect = h(
      "select",
      { class: "eqxe-style", onchange: () => this.send({ type: "style", style: this.styleSelect.value }) },
      ...this.options.styles.map((s) => h("option", { value: s, text: s })),
    );
    this.styleSelect.value = this.model.get("code_style");
    const copy = h("button", { class: "eqxe-copy", text: "Copy" });
    copy.addEventListener("click", async () => {
      const ok = await copyText(this.model.get("code"));
      copy.textContent = ok ? "Copied" : "Copy failed";
      setTimeout(() => (copy.textContent = "Copy"), 1200);
    });
    this.codeEl = h("pre", { class: "eqxe-code" });
    return h(
      "div",
      { class: "eqxe-pane eqxe-code-pane" },
      h(
        "div",
        { class: "eqxe-toolbar" },
        h("span", { class: "eqxe-title", text: "Code" }),
        this.styleSelect,
        copy,
      ),
      this.codeEl,
    );
  }

  paintCode() {
    this.codeEl.textContent = this.model.get("code");
  }

  // -- step pane ----------------------------------------------------------------------
  buildStepPane() {
    this.methodSelect = h(
      "select",
      {
        class: "eqxe-method",
        onchange: () => this.send({ type: "method", method: this.methodSelect.value }),
      },
      ...this.options.methods.map((m) => h("option", { value: m, text: m })),
    );
    this.methodSelect.value = this.model.get("method");
    this.nInput = h("input", {
      class: "eqxe-n",
      type: "number",
      min: "1",
      max: String(this.options.max_steps),
      value: "10",
    });
    // While steps run, Python refuses another Step or a Reset with a message in the banner.
    const run = (n) => this.send({ type: "step", n });
    const step = h("button", { class: "eqxe-step", text: "Step", onclick: () => run(1) });
    const runN = h("button", {
      class: "eqxe-run",
      text: "Run N",
      onclick: () => {
        const n = Math.round(Number(this.nInput.value));
        if (n >= 1 && n <= this.options.max_steps) run(n);
        else this.nInput.classList.add("eqxe-invalid");
      },
    });
    this.stopButton = h("button", {
      class: "eqxe-stop",
      text: "Stop",
      title: "end the run after the current chunk of steps; the report covers the steps done",
      onclick: () => this.send({ type: "stop" }),
    });
    const reset = h("button", { class: "eqxe-reset", text: "Reset", onclick: () => this.send({ type: "reset" }) });
    this.nInput.addEventListener("input", () => this.nInput.classList.remove("eqxe-invalid"));
    this.progressEl = h("span", { class: "eqxe-progress", role: "status" });
    this.stepInfo = h("span", { class: "eqxe-step-info" });
    this.notesEl = h("ul", { class: "eqxe-notes" });
    this.statusCounts = h("div", { class: "eqxe-status-counts" });
    this.lossEl = h("div", { class: "eqxe-loss-box" });
    const legend = h(
      "div",
      { class: "eqxe-legend" },
      ...this.options.statuses.map((s) =>
        h("span", { class: "eqxe-badge", "data-status": s, title: STATUS_TEXT[s], text: s }),
      ),
    );
    return h(
      "div",
      { class: "eqxe-pane eqxe-steps" },
      h(
        "div",
        { class: "eqxe-toolbar" },
        h("span", { class: "eqxe-title", text: "Steps" }),
        this.methodSelect,
        step,
        this.nInput,
        runN,
        this.stopButton,
        reset,
      ),
      h("div", { class: "eqxe-step-status" }, this.progressEl, this.stepInfo),
      this.statusCounts,
      this.notesEl,
      h("div", { class: "eqxe-layout", text: LAYOUT_TEXT[this.options.layout] }),
      this.lossEl,
      legend,
    );
  }

  // The `progress` trait: the running call, ticking its elapsed time here; {} when idle.
  paintProgress() {
    if (!this.progressEl) return;
    const p = this.model.get("progress");
    const running = !!p.phase;
    this.root.classList.toggle("eqxe-busy", running);
    this.stopButton.hidden = !running || p.blocking;
    this.stopButton.disabled = !!p.stopping;
    this.progressEl.hidden = !running;
    this.stepInfo.hidden = running;
    clearInterval(this.ticker);
    if (!running) return;
    this.progressEl.title = p.blocking
      ? "started from Python (w.step): interrupt the kernel to stop it"
      : this.stopButton.title;
    const tick = () => (this.progressEl.textContent = progressText(p));
    tick();
    this.ticker = setInterval(tick, 100);
  }

  // The last call's summary and the report's notes.
  paintRun(run, notes) {
    let text = "";
    if (run.total) {
      const steps = `${fmtInt(run.steps)} step${run.steps === 1 ? "" : "s"}`;
      text =
        run.steps < run.total
          ? `${run.stopped ? "stopped after" : "ran"} ${fmtInt(run.steps)} of ${fmtInt(run.total)} steps`
          : steps;
      text += ` · ${fmtSeconds(run.seconds)}`;
      if (run.compiles) text += ` · compiled ${run.compiles === 1 ? "once" : `${run.compiles}×`}`;
    }
    this.stepInfo.textContent = text;
    const counts = new Map();
    for (const code of this.status) if (code !== NO_STATUS) counts.set(code, (counts.get(code) || 0) + 1);
    const names = this.options.statuses;
    this.statusCounts.replaceChildren(
      ...[...counts.keys()].sort().map((code) =>
        h("span", { class: "eqxe-badge", "data-status": names[code], title: STATUS_TEXT[names[code]],
                    text: `${fmtInt(counts.get(code))} ${names[code]}` }),
      ),
    );
    this.notesEl.replaceChildren(...notes.map((note) => this.noteItem(note)));
    this.notesEl.hidden = !notes.length;
  }

  // A note names at most a few paths; "show all" opens the whole text.
  noteItem(note) {
    if (note.length <= NOTE_CHARS) return h("li", { text: note });
    const text = h("span", { text: `${note.slice(0, NOTE_CHARS)}…` });
    const more = h("button", { class: "eqxe-note-more", text: "show all" });
    more.addEventListener("click", () => {
      const open = more.textContent === "show all";
      text.textContent = open ? note : `${note.slice(0, NOTE_CHARS)}…`;
      more.textContent = open ? "show less" : "show all";
    });
    return h("li", {}, text, " ", more);
  }

  paintLoss() {
    if (!this.lossEl) return;
    const losses = this.model.get("losses");
    const W = 280;
    const H = 90;
    const pad = 4;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "eqxe-loss");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    const finite = losses.filter((x) => x !== null);
    const caption = h("div", { class: "eqxe-loss-caption" });
    if (!losses.length) {
      caption.textContent = "loss: no steps yet";
    } else {
      const lo = Math.min(...finite);
      const hi = Math.max(...finite);
      const span = hi - lo || 1;
      const x = (j) => pad + ((W - 2 * pad) * j) / Math.max(1, losses.length - 1);
      const y = (v) => H - pad - ((H - 2 * pad) * (v - lo)) / span;
      let segment = [];
      const flush = () => {
        if (segment.length) {
          const line = document.createElementNS(ns, "polyline");
          line.setAttribute("points", segment.join(" "));
          svg.append(line);
        }
        segment = [];
      };
      losses.forEach((v, j) => {
        if (v === null) flush();
        else segment.push(`${x(j).toFixed(1)},${y(v).toFixed(1)}`);
      });
      flush();
      const last = losses[losses.length - 1];
      const bad = losses.length - finite.length;
      caption.textContent =
        `${fmtInt(losses.length)} step${losses.length === 1 ? "" : "s"} · loss ${last === null ? "not finite" : last.toPrecision(4)}` +
        (finite.length ? ` · range ${lo.toPrecision(3)}–${hi.toPrecision(3)}` : "") +
        (bad ? ` · ${bad} non-finite` : "");
    }
    this.lossEl.replaceChildren(svg, caption);
  }

  // -- detail pane ---------------------------------------------------------------------
  paintDetail() {
    const d = this.model.get("detail");
    const el = this.detailEl;
    el.replaceChildren();
    if (!("path" in d)) {
      const hint = "Click a row to see its details; arrays show their values.";
      el.append(h("div", { class: "eqxe-hint", text: hint }));
      this.paintSelected();
      return;
    }
    const facts = [
      ["class", d.cls],
      ["value", d.summary],
      ["state", d.state],
      "owner" in d ? ["layer", d.owner || "(root)"] : null,
      d.params ? ["params", fmtInt(d.params)] : null,
      d.lr ? ["lr factor", fmtRange(...d.lr)] : null,
      d.sharding ? ["sharding", d.sharding] : null,
      ...Object.entries(d.static || {}).map(([k, v]) => [`${k} (static)`, v]),
      d.status
        ? ["last step", `${d.status}: ${(d.kind === "state" ? STATE_STATUS_TEXT : STATUS_TEXT)[d.status]}`]
        : null,
      d.note ? ["note", d.note] : null,
      d.norms && d.norms[3] != null ? ["lr factor in the step", fmtFactor(d.norms[3])] : null,
      d.norms ? ["norms", fmtNorms(d.norms.map((v) => v ?? NaN))] : null,
    ].filter(Boolean);
    el.append(
      h("div", { class: "eqxe-title", text: d.path || "(root)" }),
      h("dl", {}, ...facts.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v) })])),
    );
    if (d.repr) el.append(h("pre", { class: "eqxe-repr", text: d.repr }));
    for (const [key, title] of [
      ["value_html", "values"],
      ["update_html", "change made by the last step call"],
    ]) {
      if (!d[key]) continue;
      const box = h("div", { class: "eqxe-ts" });
      el.append(h("div", { class: "eqxe-subtitle", text: title }), box);
      setHTML(box, d[key]);
      themeTreescope(box);
    }
    this.paintSelected();
  }
}

export default {
  render({ model, el }) {
    const view = new ExplorerView(model, el);
    return () => view.destroy();
  },
};
