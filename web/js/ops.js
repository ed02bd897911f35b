// Recovery operations on a VPG: the buttons (operator and admin only), their confirmation
// dialogs, the live progress of the running operation, and recovery report rendering.
//
// The VPG JSON carries no operation fields, so the running operation is the newest task of
// this VPG whose kind is a recovery kind and that has not finished (`finished_at` null);
// its state (`running`, `waiting`, `failed` after a decision) and `details.decision` say
// which decisions the manager accepts now. Tasks arrive on the live stream (a delta per
// step), so nothing here polls.

import { api, listPage } from './api.js';
import { h, replace, uid, field, fmtSecs, fmtTime, fmtBytes } from './dom.js';
import { label } from './lookups.js';
import { progressBar, problemBox } from './components.js';

export const RECOVERY_KINDS = new Set(['failover_test', 'failover', 'move']);

const KIND_WORDS = { failover_test: 'Failover test', failover: 'Failover', move: 'Move' };
const STEP_WORDS = {
  prepare: 'Prepare',
  tag_test_start: 'Tag the test start',
  bump_fencing: 'Fence the protected site',
  shut_down_protected: 'Shut down the protected VMs',
  final_checkpoint: 'Final checkpoint',
  recover: 'Bring the VMs up at the recovery site',
  power_on: 'Power on (boot order)',
  before_commit: 'Before commit: waiting for commit or rollback',
  testing: 'Testing: waiting for stop',
  stop_protection: 'Stop protection',
  promote: 'Promote the journal',
  seed_reverse: 'Seed reverse protection',
  reverse_protection: 'Start reverse protection',
  mark_recovered: 'Mark the VPG recovered',
  discard: 'Remove the recovered VMs',
  restart_protected: 'Restart the protected VMs',
  record_test: 'Record the test',
};
const STEP_STATE_WORDS = { pending: 'Pending', running: 'Running', succeeded: 'Done', failed: 'Failed', skipped: 'Skipped' };
const RESULT_WORDS = {
  committed: 'Committed',
  committed_reverse_protected: 'Committed, reverse protected',
  rolled_back: 'Rolled back',
  stopped: 'Stopped',
  failed: 'Failed',
};

export const kindWord = (k) => KIND_WORDS[k] || k;
export const stepWord = (s) => STEP_WORDS[s] || s;
export const resultWord = (r) => RESULT_WORDS[r] || r;

/** Task state words; `waiting` (VMs up, the operator decides) is not in the lookups. */
export function taskStateWord(t) {
  if (t.state === 'waiting') return t.kind === 'failover_test' ? 'Testing' : 'Before commit';
  return label('task_states', t.state);
}

/** Operation tasks report progress 0–100. */
export const fraction = (p) => Math.max(0, Math.min(1, (p || 0) / 100));

/** The recovery operation holding the VPG now, if any. */
export function activeOperation(store, vpgId) {
  let best = null;
  for (const t of store.tasks.values()) {
    if (t.vpg_id !== vpgId || !RECOVERY_KINDS.has(t.kind) || t.finished_at) continue;
    if (!best || Date.parse(t.created_at) > Date.parse(best.created_at)) best = t;
  }
  return best;
}

/** The newest recovery task of the VPG, finished or not. */
export function latestOperation(store, vpgId) {
  let best = null;
  for (const t of store.tasks.values()) {
    if (t.vpg_id !== vpgId || !RECOVERY_KINDS.has(t.kind)) continue;
    if (!best || Date.parse(t.created_at) > Date.parse(best.created_at)) best = t;
  }
  return best;
}

/**
 * What the manager accepts now, from the VPG and its running operation:
 * { start, stopTest, decide, pause, resume, forceSync, note, op }.
 */
export function phase(v, op) {
  const decision = op?.details?.decision || null;
  const waiting = op && op.state === 'waiting' && !decision;
  const retry = op && op.state === 'failed' && decision; // a step failed past the decision
  const settled = !['initializing', 'deleting', 'recovered', 'failing_over', 'moving'].includes(v.status);
  const out = {
    op,
    start: !op && settled && v.vm_count > 0 && !v.paused,
    stopTest: !!(op && op.kind === 'failover_test' && (waiting || (retry && decision === 'stop'))),
    commit: !!(op && op.kind !== 'failover_test' && (waiting || (retry && decision === 'commit'))),
    rollback: !!(op && op.kind !== 'failover_test' && (waiting || (retry && decision === 'rollback'))),
    pause: !op && !v.paused && !['deleting', 'recovered'].includes(v.status),
    resume: !op && v.paused && !['deleting', 'recovered'].includes(v.status),
    forceSync: !op && !v.paused && !['deleting', 'recovered', 'initializing'].includes(v.status),
    note: '',
  };
  if (op) {
    const what = kindWord(op.kind).toLowerCase();
    if (retry) out.note = `The ${what} failed while ending (${decision}); retry it.`;
    else if (decision) out.note = `The ${what} is ending (${decision}).`;
    else if (waiting) out.note = op.kind === 'failover_test' ? 'A failover test runs: stop it before anything else.' : `The ${what} is before commit: commit or roll back.`;
    else out.note = `The ${what} is bringing the VMs up.`;
  } else if (v.paused) {
    out.note = 'Protection is paused: resume it before recovering.';
  } else if (!settled) {
    out.note = `Recovery operations wait while the VPG is ${label('vpg_statuses', v.status)}.`;
  }
  return out;
}

// ---- dialogs ------------------------------------------------------------------------

const FOCUSABLE = 'button, [href], input, select, textarea, [tabindex]:not([tabindex="-1"])';

/**
 * A modal confirmation dialog. `fields` are elements placed in the form; `submit()` is
 * called on confirm and may throw an ApiError (shown in the dialog, which stays open).
 * `typeToConfirm`: the confirm button waits until this exact text is typed.
 * Resolves with submit()'s result, or null when cancelled (Esc or Cancel). Focus goes
 * back to `returnFocus()` when the dialog closes.
 */
export function openDialog({ id, title, intro = null, fields = [], confirm = 'Confirm', danger = false,
  typeToConfirm = null, submit, returnFocus = null }) {
  return new Promise((resolve) => {
    const titleId = uid('dlg-title');
    const errSlot = h('div', { class: 'dialog-error', id: `${id}-error` });
    const confirmBtn = h('button', { type: 'submit', class: danger ? 'danger' : 'primary', id: `${id}-confirm` }, confirm);
    const cancelBtn = h('button', { type: 'button', id: `${id}-cancel` }, 'Cancel');
    let nameIn = null;
    const checkName = () => { if (nameIn) confirmBtn.disabled = busy || nameIn.value !== typeToConfirm; };
    if (typeToConfirm) {
      nameIn = h('input', { id: `${id}-name`, name: 'confirm-name', autocomplete: 'off', spellcheck: 'false', required: true });
      nameIn.addEventListener('input', checkName);
      confirmBtn.disabled = true;
    }
    const form = h('form', { method: 'dialog', novalidate: true },
      h('h2', { id: titleId }, title),
      intro ? h('div', { class: 'dialog-intro' }, intro) : null,
      fields,
      nameIn ? field(`Type the VPG name “${typeToConfirm}” to confirm`, nameIn, 'This cannot be undone by a click: the name guards against a mis-click.') : null,
      errSlot,
      h('div', { class: 'actions' }, cancelBtn, confirmBtn));
    const dlg = h('dialog', { class: 'op-dialog', id, 'aria-labelledby': titleId }, form);
    let busy = false;
    let result = null;

    cancelBtn.addEventListener('click', () => dlg.close('cancel'));
    // Esc cancels, except while the request is in flight (its answer must be seen).
    dlg.addEventListener('cancel', (e) => { if (busy) e.preventDefault(); });
    // Keep Tab inside the dialog (showModal makes the page inert; this also keeps the
    // focus off the browser's own UI).
    dlg.addEventListener('keydown', (e) => {
      if (e.key !== 'Tab') return;
      const els = [...dlg.querySelectorAll(FOCUSABLE)].filter((el) => !el.disabled && el.offsetParent !== null);
      if (!els.length) return;
      const first = els[0];
      const last = els[els.length - 1];
      if (e.shiftKey && document.activeElement === first) { e.preventDefault(); last.focus(); }
      else if (!e.shiftKey && document.activeElement === last) { e.preventDefault(); first.focus(); }
    });
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (busy) return;
      if (nameIn && nameIn.value !== typeToConfirm) { nameIn.focus(); return; }
      busy = true;
      confirmBtn.disabled = true;
      cancelBtn.disabled = true;
      dlg.setAttribute('aria-busy', 'true');
      replace(errSlot, h('p', { class: 'muted', role: 'status' }, 'Sending…'));
      try {
        result = await submit();
        busy = false;
        dlg.close('done');
      } catch (err) {
        busy = false;
        dlg.removeAttribute('aria-busy');
        replace(errSlot, problemBox(err));
        cancelBtn.disabled = false;
        confirmBtn.disabled = false;
        checkName();
        confirmBtn.focus();
      }
    });
    dlg.addEventListener('close', () => {
      dlg.remove();
      try { returnFocus?.(); } catch { /* the page is gone */ }
      resolve(dlg.returnValue === 'done' ? result : null);
    });
    document.body.append(dlg);
    dlg.showModal();
    const first = [...dlg.querySelectorAll('input, select, textarea')].find((el) => !el.disabled) || cancelBtn;
    first.focus();
  });
}

function cpLabel(c) {
  return `${fmtTime(c.taken_at)} — ${label('checkpoint_kinds', c.kind)}${c.tag ? ` “${c.tag}”` : ''}`;
}

/** The checkpoint picker: latest, latest tagged, (app-consistent), or a recoverable one. */
function checkpointPicker(vpgId, { appConsistent = false } = {}) {
  const list = h('optgroup', { label: 'Recoverable checkpoints (loading…)' });
  const sel = h('select', { id: uid('cp'), name: 'checkpoint' },
    h('option', { value: 'latest' }, 'Latest recoverable checkpoint'),
    h('option', { value: 'latest_tagged' }, 'Latest tagged checkpoint'),
    appConsistent ? h('option', { value: 'latest_app_consistent' }, 'Latest app-consistent checkpoint') : null,
    list);
  listPage(`/vpgs/${vpgId}/checkpoints?recoverable=true`, 100).then((page) => {
    const items = [...page.items].sort((a, b) => Date.parse(b.taken_at) - Date.parse(a.taken_at));
    list.label = `Recoverable checkpoints (${items.length})`;
    list.replaceChildren(...items.map((c) => h('option', { value: String(c.id), dataset: { tag: c.tag || '' } }, cpLabel(c))));
  }).catch(() => { list.label = 'Recoverable checkpoints (could not be listed)'; });
  return { wrap: field('Checkpoint', sel, 'The point in time the VMs come up from.'), sel };
}

/** Commit policy: none / commit after N min / roll back after N min. */
function commitPolicyPicker() {
  const name = uid('policy');
  const mins = h('input', { id: uid('mins'), type: 'number', min: 1, max: 1440, value: 10, name: 'commit-after', inputmode: 'numeric' });
  const radio = (value, text, checked) => {
    const r = h('input', { type: 'radio', name, value, id: uid('pol'), checked });
    return { r, el: h('div', { class: 'field check' }, r, h('label', { for: r.id }, text)) };
  };
  const opts = [radio('none', 'None: wait for the operator', true), radio('commit', 'Commit after the delay', false),
    radio('rollback', 'Roll back after the delay', false)];
  const sync = () => { mins.disabled = opts[0].r.checked; };
  for (const o of opts) o.r.addEventListener('change', sync);
  sync();
  const wrap = h('fieldset', {}, h('legend', {}, 'Commit policy'), opts.map((o) => o.el),
    field('Delay (minutes)', mins, 'How long the recovered VMs run before the policy acts.'));
  return {
    wrap,
    value() {
      const action = opts.find((o) => o.r.checked).r.value;
      if (action === 'none') return { commit_policy: 'none' };
      const m = Number(mins.value);
      return { commit_policy: action, commit_after_secs: Number.isFinite(m) && m > 0 ? Math.round(m * 60) : undefined };
    },
  };
}

function checkbox(text, checked, hint) {
  const input = h('input', { type: 'checkbox', id: uid('chk'), checked });
  return { input, wrap: h('div', { class: 'field check' }, input, h('label', { for: input.id }, text), hint ? h('small', { class: 'hint' }, hint) : null) };
}

function notesField(text = 'Notes') {
  const input = h('textarea', { id: uid('notes'), rows: 2, maxlength: 2000, name: 'notes' });
  return { input, wrap: field(text, input, 'Kept in the recovery report.') };
}

const clean = (o) => Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined && v !== '' && v !== null));

/**
 * The operations controller of one VPG page.
 * `getVpg()` the VPG now (stream or REST), `getDetail()` GET /vpgs/{id} (members),
 * `onDone(kind, result)` after the manager accepted a request.
 */
export function createOps(ctx, vpgId, { getVpg, getDetail, onDone }) {
  const focusBack = (btnId) => () => {
    // The header re-renders live: find the button again by id (or the button that
    // replaced it, e.g. Stop test after Test failover).
    const b = document.getElementById(btnId);
    const other = document.getElementById('vpg-ops')?.querySelector('button:not(:disabled)');
    const target = b && !b.disabled ? b : other || document.getElementById('view');
    target?.focus();
  };
  const post = (path, body) => api(`/vpgs/${vpgId}${path}`, { method: 'POST', body });

  function testDialog(v) {
    const cp = checkpointPicker(vpgId, { appConsistent: true });
    const members = getDetail()?.members || [];
    const vmChecks = members.map((m) => ({ m, c: checkbox(m.vm_name, true) }));
    const hours = h('input', { id: uid('hours'), type: 'number', min: 0.1, step: 0.1, value: 8, name: 'max-hours', inputmode: 'decimal' });
    const notes = notesField();
    return openDialog({
      id: 'dlg-failover-test',
      title: `Test failover of ${v.name}`,
      intro: h('p', {}, 'Test copies of the VMs (named “<vm> - Test”) come up at the recovery site on the test network. Protection goes on; stopping the test discards them.'),
      fields: [cp.wrap,
        members.length ? h('fieldset', {}, h('legend', {}, 'VMs to test'), vmChecks.map((x) => x.c.wrap)) : null,
        field('Stop by itself after (hours)', hours, 'The test’s time box.'), notes.wrap],
      confirm: 'Start test',
      returnFocus: focusBack('op-test'),
      submit: () => {
        const chosen = vmChecks.filter((x) => x.c.input.checked).map((x) => x.m.vm_id);
        const hrs = Number(hours.value);
        return post('/failover-test', clean({
          checkpoint: cp.sel.value,
          vm_ids: chosen.length && chosen.length < members.length ? chosen : undefined,
          max_duration_secs: Number.isFinite(hrs) && hrs > 0 ? Math.max(1, Math.round(hrs * 3600)) : undefined,
          notes: notes.input.value.trim(),
        }));
      },
    });
  }

  function stopTestDialog(v) {
    const name = uid('result');
    const pass = h('input', { type: 'radio', name, value: 'passed', id: uid('res'), checked: true });
    const fail = h('input', { type: 'radio', name, value: 'failed', id: uid('res') });
    const notes = notesField();
    return openDialog({
      id: 'dlg-stop-test',
      title: `Stop the failover test of ${v.name}`,
      intro: h('p', {}, 'The test VMs are removed and their writes discarded; the test is recorded.'),
      fields: [h('fieldset', {}, h('legend', {}, 'Test result'),
        h('div', { class: 'field check' }, pass, h('label', { for: pass.id }, 'Passed')),
        h('div', { class: 'field check' }, fail, h('label', { for: fail.id }, 'Failed'))), notes.wrap],
      confirm: 'Stop test',
      returnFocus: focusBack('op-stop-test'),
      submit: () => post('/failover-test/stop', clean({ result: fail.checked ? 'failed' : 'passed', notes: notes.input.value.trim() })),
    });
  }

  function failoverDialog(v, move) {
    const cp = move ? null : checkpointPicker(vpgId);
    const policy = commitPolicyPicker();
    const reverse = checkbox('Reverse protection when committed', move,
      'The recovery site becomes the protected one and changes sync back.');
    const shut = move ? null : checkbox('Shut down the protected VMs first (where their hosts answer)', true);
    const notes = notesField();
    const what = move ? 'Move' : 'Failover';
    return openDialog({
      id: move ? 'dlg-move' : 'dlg-failover',
      title: `${what} ${v.name}`,
      intro: h('p', { class: 'warn-text' }, move
        ? 'A planned move: the protected VMs shut down cleanly, a final checkpoint is taken, and the VMs run at the recovery site.'
        : 'A live failover: the VMs run at the recovery site from the chosen checkpoint; the protected VMs are shut down.'),
      fields: [cp?.wrap, policy.wrap, reverse.wrap, shut?.wrap, notes.wrap],
      confirm: `Start ${what.toLowerCase()}`,
      danger: true,
      typeToConfirm: v.name,
      returnFocus: focusBack(move ? 'op-move' : 'op-failover'),
      submit: () => post(move ? '/move' : '/failover', clean({
        checkpoint: cp?.sel.value,
        ...policy.value(),
        reverse_protection: reverse.input.checked,
        shut_down_protected: shut ? shut.input.checked : undefined,
        notes: notes.input.value.trim(),
      })),
    });
  }

  function commitDialog(v, op) {
    const dflt = op?.details?.reverse_protection ?? op?.kind === 'move';
    const reverse = checkbox('Reverse protection', dflt, 'Protect the recovered VMs back towards the old protected site.');
    return openDialog({
      id: 'dlg-commit',
      title: `Commit the ${kindWord(op?.kind).toLowerCase()} of ${v.name}`,
      intro: h('p', {}, 'The journal is promoted up to the checkpoint into the recovered disks; this ends the chance to roll back.'),
      fields: [reverse.wrap],
      confirm: 'Commit',
      danger: true,
      returnFocus: focusBack('op-commit'),
      submit: () => post('/commit', { reverse_protection: reverse.input.checked }),
    });
  }

  function rollbackDialog(v, op) {
    return openDialog({
      id: 'dlg-rollback',
      title: `Roll back the ${kindWord(op?.kind).toLowerCase()} of ${v.name}`,
      intro: h('p', {}, 'The recovered VMs are removed and the original VMs started again; protection goes on as before.'),
      confirm: 'Roll back',
      danger: true,
      returnFocus: focusBack('op-rollback'),
      submit: () => post('/rollback'),
    });
  }

  function simpleDialog(v, what) {
    const words = {
      pause: ['Pause protection', `Pause protection of ${v.name}`, 'Writes are only tracked until protection resumes; the RPO grows meanwhile.', 'op-pause'],
      resume: ['Resume protection', `Resume protection of ${v.name}`, 'What changed meanwhile is sent by a bitmap sync.', 'op-resume'],
      'force-sync': ['Force sync', `Force a sync of ${v.name}`, 'Every disk runs a delta sync now: block hashes are compared and differing blocks sent.', 'op-force-sync'],
    }[what];
    return openDialog({
      id: `dlg-${what}`,
      title: words[1],
      intro: h('p', {}, words[2]),
      confirm: words[0],
      returnFocus: focusBack(words[3]),
      submit: () => post(`/${what}`),
    });
  }

  async function run(kind, fn) {
    const r = await fn();
    if (r) onDone?.(kind, r);
  }

  /** The buttons for `#vpg-ops` (none for viewers). */
  function buttons(v, op) {
    if (!ctx.can('operator') || !v) return [];
    const p = phase(v, op);
    const btn = (id, text, enabled, onclick, cls = '') => h('button', { type: 'button', id, class: cls || null,
      disabled: !enabled, 'aria-describedby': p.note ? 'ops-note' : null, onclick: () => onclick() }, text);
    const testing = op?.kind === 'failover_test';
    const beforeCommit = op && op.kind !== 'failover_test';
    return [
      testing
        ? btn('op-stop-test', 'Stop test', p.stopTest, () => run('stop-test', () => stopTestDialog(v)), 'primary')
        : btn('op-test', 'Test failover', p.start, () => run('failover-test', () => testDialog(v))),
      btn('op-failover', 'Failover', p.start, () => run('failover', () => failoverDialog(v, false)), 'danger'),
      btn('op-move', 'Move', p.start, () => run('move', () => failoverDialog(v, true))),
      beforeCommit ? btn('op-commit', 'Commit', p.commit, () => run('commit', () => commitDialog(v, op)), 'primary') : null,
      beforeCommit ? btn('op-rollback', 'Rollback', p.rollback, () => run('rollback', () => rollbackDialog(v, op))) : null,
      v.paused
        ? btn('op-resume', 'Resume', p.resume, () => run('resume', () => simpleDialog(v, 'resume')))
        : btn('op-pause', 'Pause', p.pause, () => run('pause', () => simpleDialog(v, 'pause'))),
      btn('op-force-sync', 'Force sync', p.forceSync, () => run('force-sync', () => simpleDialog(v, 'force-sync'))),
      p.note ? h('span', { class: 'ops-note muted', id: 'ops-note' }, p.note) : null,
    ];
  }

  return { buttons };
}

// ---- live progress --------------------------------------------------------------------

/** Countdown seconds, ticking locally from when the task's figure last arrived. */
export class Countdowns {
  constructor() { this.seen = new Map(); }
  remaining(t) {
    const c = t.details?.countdown_secs;
    if (c === null || c === undefined) return null;
    const prev = this.seen.get(t.id);
    if (!prev || prev.task !== t) this.seen.set(t.id, { task: t, value: c, at: Date.now() });
    const s = this.seen.get(t.id);
    return Math.max(0, s.value - (Date.now() - s.at) / 1000);
  }
}

/**
 * The VMs the recovery hosts brought up. `details.recovered[].vms[].power_state` is the
 * state at the recover step (always off) and is not updated by power-on or discard, so
 * the words here come from the steps when they say more.
 */
function recoveredList(details, steps = []) {
  const vms = (details?.recovered || []).flatMap((r) => (r.vms || []).map((vm) => ({ ...vm, scratch: r.scratch_bytes, full: r.scratch_full })));
  if (!vms.length) return null;
  const done = (name) => steps.some((s) => s.name === name && s.state === 'succeeded');
  const state = (vm) => (done('discard') ? 'removed' : done('power_on') ? 'powered on' : label('power_states', vm.power_state));
  return h('ul', { class: 'recovered', id: 'op-recovered' }, vms.map((vm) => h('li', { dataset: { vm: vm.name } },
    h('strong', {}, vm.name), ` from ${vm.source_vm}, `, state(vm),
    vm.disks?.length ? h('span', { class: 'muted' }, ` — ${vm.disks.map((d) => `${d.name} (${fmtBytes(d.size_bytes)})`).join(', ')}`) : null)));
}

/** The step list: each step with its state, timing and message. */
export function stepList(steps, current = -1, id = null) {
  return h('ol', { class: 'op-steps', id }, steps.map((s, i) => {
    const took = s.started_at && s.finished_at ? (Date.parse(s.finished_at) - Date.parse(s.started_at)) / 1000 : null;
    return h('li', { class: `step-${s.state}`, dataset: { step: s.name, state: s.state }, 'aria-current': i === current && s.state === 'running' ? 'step' : null },
      h('span', { class: 'step-state' }, STEP_STATE_WORDS[s.state] || s.state), ' ',
      h('span', { class: 'step-name' }, stepWord(s.name)),
      took !== null ? h('span', { class: 'muted' }, ` ${fmtSecs(took)}`) : null,
      s.message ? h('span', { class: s.state === 'failed' ? 'bad-text step-msg' : 'muted step-msg' }, ` — ${s.message}`) : null);
  }));
}

/** The running (or just finished) operation of a VPG. */
export function progressPanel(t, countdowns) {
  if (!t) return null;
  const d = t.details || {};
  const cur = t.steps[t.current_step];
  const left = countdowns.remaining(t);
  let countdown = null;
  if (left !== null) {
    const action = d.commit_policy?.action;
    const what = t.kind === 'failover_test' ? 'The test stops by itself in'
      : action === 'rollback' ? 'Rolls back by itself in' : 'Commits by itself in';
    countdown = h('p', { class: 'countdown', id: 'op-countdown', role: 'timer', 'aria-live': 'off' }, `${what} `, h('strong', {}, fmtSecs(left)));
  }
  const finished = !!t.finished_at;
  return h('div', { class: `card op-panel ${finished ? 'done' : ''}`, id: 'op-progress', dataset: { task: t.id, state: t.state, kind: t.kind } },
    h('div', { class: 'op-title' },
      h('h2', { id: 's-op' }, `${kindWord(t.kind)} — `, h('span', { id: 'op-state' }, finished ? label('task_states', t.state) : taskStateWord(t))),
      progressBar(fraction(t.progress), `${kindWord(t.kind)} progress`)),
    h('p', { class: 'muted' }, `Started ${fmtTime(t.created_at)} by ${t.created_by}`,
      d.checkpoint_at ? `; checkpoint ${fmtTime(d.checkpoint_at)} (${d.checkpoint})` : '',
      d.decision ? `; decision: ${d.decision}${d.decided_by ? ` by ${d.decided_by}` : ''}${d.decision_reason ? ` (${d.decision_reason})` : ''}` : '',
      finished ? `; finished ${fmtTime(t.finished_at)}` : ''),
    !finished && cur ? h('p', { id: 'op-current' }, 'Now: ', h('strong', {}, stepWord(cur.name))) : null,
    countdown,
    t.error || d.failure ? problemBox({ problem: { title: 'Operation error', detail: t.error || d.failure } }) : null,
    stepList(t.steps, t.current_step, 'op-steps'),
    recoveredList(d, t.steps) ? h('div', {}, h('h3', {}, 'Recovered VMs'), recoveredList(d, t.steps)) : null);
}

// ---- reports --------------------------------------------------------------------------

const rto = (r) => (r.rto_ms === null || r.rto_ms === undefined ? '–' : `${(r.rto_ms / 1000).toFixed(1)} s`);

/** A table of recovery reports; `href(r)` links a row to its detail. */
export function reportTable(reports, { id = 'report-table', showVpg = false, href } = {}) {
  if (!reports.length) return h('p', { class: 'muted', id: `${id}-empty` }, 'No recovery report yet.');
  const cols = ['Kind', ...(showVpg ? ['VPG'] : []), 'Result', 'Checkpoint', 'Who', 'Started', 'Ended', 'RTO'];
  return h('div', { class: 'table-wrap' }, h('table', { class: 'grid', id },
    h('caption', { class: 'sr-only' }, 'Recovery reports, newest first'),
    h('thead', {}, h('tr', {}, cols.map((c) => h('th', { scope: 'col' }, c)))),
    h('tbody', {}, reports.map((r) => h('tr', { dataset: { report: r.id, kind: r.kind, result: r.result } },
      h('th', { scope: 'row', 'data-label': 'Kind' }, h('a', { href: href(r) }, kindWord(r.kind))),
      showVpg ? h('td', { 'data-label': 'VPG' }, h('a', { href: `#/vpgs/${r.vpg_id}` }, r.vpg_name)) : null,
      h('td', { 'data-label': 'Result' }, h('span', { class: `badge ${/failed/.test(r.result) || r.details?.test_result === 'failed' ? 'bad' : 'ok'}` }, resultWord(r.result)),
        r.details?.test_result ? h('span', { class: 'muted' }, ` test ${r.details.test_result}`) : null),
      h('td', { 'data-label': 'Checkpoint' }, r.checkpoint_at ? fmtTime(r.checkpoint_at) : '–'),
      h('td', { 'data-label': 'Who' }, r.created_by),
      h('td', { 'data-label': 'Started' }, h('time', { datetime: r.started_at }, fmtTime(r.started_at))),
      h('td', { 'data-label': 'Ended' }, h('time', { datetime: r.ended_at }, fmtTime(r.ended_at))),
      h('td', { 'data-label': 'RTO', class: 'num' }, rto(r)))))));
}

/** One report: summary and every step with its timing and result. */
export function reportDetail(r) {
  const d = r.details || {};
  const rows = [
    ['Kind', kindWord(r.kind)],
    ['VPG', h('a', { href: `#/vpgs/${r.vpg_id}` }, r.vpg_name)],
    ['Result', resultWord(r.result)],
    d.test_result ? ['Test result', d.test_result.charAt(0).toUpperCase() + d.test_result.slice(1)] : null,
    ['Checkpoint', r.checkpoint_at ? `${fmtTime(r.checkpoint_at)} (#${r.checkpoint_id})` : '–'],
    ['Started by', r.created_by],
    ['Started', fmtTime(r.started_at)],
    ['Ended', fmtTime(r.ended_at)],
    ['Duration', fmtSecs((Date.parse(r.ended_at) - Date.parse(r.started_at)) / 1000)],
    ['RTO (request to every VM running)', rto(r)],
    d.decision ? ['Decision', `${d.decision}${d.decided_by ? ` by ${d.decided_by}` : ''}${d.decision_reason ? ` (${d.decision_reason})` : ''}`] : null,
    d.unreachable_hosts?.length ? ['Unreachable hosts', d.unreachable_hosts.join(', ')] : null,
    ['Notes', r.notes || '–'],
  ].filter(Boolean);
  return h('div', { class: 'report-detail', id: 'report-detail', dataset: { report: r.id } },
    h('dl', { class: 'settings' }, rows.map(([k, val]) => h('div', {}, h('dt', {}, k), h('dd', {}, val)))),
    d.failure ? problemBox({ problem: { title: 'Failure', detail: d.failure } }) : null,
    h('h3', {}, 'Steps'),
    h('div', { class: 'table-wrap' }, h('table', { class: 'grid', id: 'report-steps' },
      h('thead', {}, h('tr', {}, ['Step', 'Result', 'Started', 'Finished', 'Took', 'Message'].map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, r.steps.map((s) => h('tr', { dataset: { step: s.name, state: s.state } },
        h('th', { scope: 'row', 'data-label': 'Step' }, stepWord(s.name)),
        h('td', { 'data-label': 'Result' }, STEP_STATE_WORDS[s.state] || s.state),
        h('td', { 'data-label': 'Started' }, s.started_at ? fmtTime(s.started_at) : '–'),
        h('td', { 'data-label': 'Finished' }, s.finished_at ? fmtTime(s.finished_at) : '–'),
        h('td', { 'data-label': 'Took', class: 'num' }, s.started_at && s.finished_at ? fmtSecs((Date.parse(s.finished_at) - Date.parse(s.started_at)) / 1000) : '–'),
        h('td', { 'data-label': 'Message' }, s.message || '')))))),
    recoveredList(d, r.steps) ? h('div', {}, h('h3', {}, 'Recovered VMs'), recoveredList(d, r.steps)) : null);
}
