// Create / edit a VPG, step by step: general, VMs (unprotected inventory), recovery
// (host, storage, boot order, networks and re-IP per VM and NIC, the VPG's network
// mappings), SLA settings, review. The manager validates: its problem documents are
// shown as they come, next to the field they name.

import { api, listAll, ApiError } from '../api.js';
import { h, replace, field, fmtBytes } from '../dom.js';
import { label, values } from '../lookups.js';
import { problemBox } from '../components.js';

const STEPS = ['General', 'VMs', 'Recovery', 'SLA and journal', 'Review'];

/** Which step shows a field the API names (`settings.rpo_target_secs`, `members[0]…`). */
function stepOfField(f) {
  if (!f) return null;
  if (f.startsWith('settings.network_mappings')) return 2;
  if (f.startsWith('settings.')) return 3;
  if (f.startsWith('members')) return /^members\[\d+\]\./.test(f) && !/^members\[\d+\]\.vm_id/.test(f) ? 2 : 1;
  if (/recovery_site|protected_site|name|description/.test(f)) return 0;
  return null;
}

/**
 * The input key (see `inputs`) of a member field the API names, relative to
 * `members[i].`: `recovery_storage_path`, `nics[j].test_network`, `nics[j].address` (a
 * re-IP error; `nics[j].reip.address` is understood too), `nics[j].dns[1]`, …
 */
function memberInputKey(member, rest) {
  const vm = member.vm_id;
  const direct = { recovery_host_id: 'host', boot_group: 'boot_group', boot_delay_secs: 'boot_delay',
    failover_network: 'failover', test_network: 'test', recovery_storage_path: 'storage' };
  if (direct[rest]) return `${vm}:${direct[rest]}`;
  if (rest === 'vm_id') return `vm:${vm}`;
  const m = /^nics\[(\d+)\](?:\.(?:reip\.)?([a-z_]+))?/.exec(rest);
  if (!m) return null;
  const nic = member.nics?.[Number(m[1])]?.nic;
  if (nic === undefined) return null;
  const part = { failover_network: 'failover', test_network: 'test', address: 'addr', prefix: 'prefix',
    gateway: 'gw', dns: 'dns', reip: 'addr' }[m[2] || 'failover_network'];
  return part ? `${vm}:nic:${nic}:${part}` : null;
}

/** "10.0.0.5/24 via 10.0.0.1, DNS 10.0.0.53" */
function reipText(r) {
  if (!r) return null;
  return `${r.address}/${r.prefix}${r.gateway ? ` via ${r.gateway}` : ''}${r.dns?.length ? `, DNS ${r.dns.join(', ')}` : ''}`;
}

/**
 * The field a problem names. A body the manager could not even parse (`request.invalid_body`,
 * e.g. a re-IP without a prefix) names it only in its detail, as a path before a colon.
 */
function fieldOf(err) {
  if (!err) return null;
  if (err.field) return err.field;
  if (err.code !== 'request.invalid_body') return null;
  return /\b((?:members|settings)(?:\[\d+\]|\.[a-z_]+)+):/.exec(err.problem?.detail || '')?.[1] ?? null;
}

const safeId = (s) => String(s).replace(/[^a-z0-9_-]/gi, '_');

const num = (v) => (v === '' || v === null || v === undefined ? NaN : Number(v));

export function mount(root, ctx, params) {
  const editId = params.id || null;
  let step = 0;
  let sites = [];
  let hosts = [];
  let candidates = []; // VMs that may be chosen
  let existing = null; // the VPG being edited
  const model = {
    name: '', description: '', recovery_site_id: '', protected_site_id: '',
    settings: null,
    members: new Map(), // vm_id -> MemberSettings
  };
  // Network mapping rows as shown (empty rows too, while being typed); the non-empty
  // ones are `settings.network_mappings`.
  let mapRows = [];
  const mappings = () => mapRows.filter((r) => r.from.trim() || r.to.trim()).map((r) => ({ from: r.from.trim(), to: r.to.trim() }));
  const stepNav = h('ol', { class: 'steps', 'aria-label': 'Steps' });
  const body = h('div', { class: 'step-body' });
  const errSlot = h('div', { id: 'wizard-error' });
  const back = h('button', { type: 'button', id: 'wiz-back' }, 'Back');
  const next = h('button', { type: 'button', class: 'primary', id: 'wiz-next' }, 'Next');
  const form = h('form', { class: 'wizard', novalidate: true, 'aria-labelledby': 'wiz-title' },
    stepNav, errSlot, body, h('div', { class: 'actions' }, back, next));

  replace(root, h('p', { class: 'crumbs' }, h('a', { href: '#/vpgs' }, 'VPGs'), ' / '),
    h('h1', { id: 'wiz-title' }, editId ? 'Edit VPG' : 'New VPG'), form);

  back.addEventListener('click', () => go(step - 1));
  next.addEventListener('click', () => (step === STEPS.length - 1 ? submit() : go(step + 1)));
  form.addEventListener('submit', (e) => { e.preventDefault(); next.click(); });

  function go(i) {
    collect();
    step = Math.max(0, Math.min(STEPS.length - 1, i));
    render();
    body.querySelector('input, select, textarea, button')?.focus();
  }

  // ---- reading the inputs back into the model ---------------------------------------
  const inputs = {};
  function collect() {
    const v = (k) => inputs[k]?.value;
    if (step === 0) {
      model.name = v('name');
      model.description = v('description');
      model.recovery_site_id = v('recovery_site_id');
    } else if (step === 1) {
      for (const vm of candidates) {
        const box = inputs[`vm:${vm.id}`];
        if (!box) continue;
        if (box.checked && !model.members.has(vm.id)) {
          model.members.set(vm.id, { vm_id: vm.id, recovery_host_id: null, recovery_storage_path: null, boot_group: 0,
            boot_delay_secs: 0, failover_network: null, test_network: null, nics: [] });
        } else if (!box.checked) model.members.delete(vm.id);
      }
    } else if (step === 2) {
      for (const m of model.members.values()) {
        const k = (f) => inputs[`${m.vm_id}:${f}`]?.value;
        m.recovery_host_id = k('host') || null;
        m.boot_group = num(k('boot_group'));
        m.boot_delay_secs = num(k('boot_delay'));
        m.failover_network = k('failover') || null;
        m.test_network = k('test') || null;
        m.recovery_storage_path = k('storage') || null;
        const vm = candidates.find((c) => c.id === m.vm_id);
        if (!vm) continue; // NICs unknown: keep the member's NIC settings as they are
        const keep = new Map(m.nics.map((n) => [n.nic, n]));
        m.nics = vm.nics.map((n) => {
          const nk = (f) => inputs[`${m.vm_id}:nic:${n.name}:${f}`];
          if (!nk('failover')) return keep.get(n.name) || null; // not shown: unchanged
          const val = (f) => nk(f).value.trim();
          const address = val('addr');
          const reip = address ? {
            address,
            prefix: num(val('prefix')),
            gateway: val('gw') || null,
            dns: val('dns').split(',').map((d) => d.trim()).filter(Boolean),
          } : null;
          const fo = val('failover') || null;
          const test = val('test') || null;
          return fo || test || reip ? { nic: n.name, failover_network: fo, test_network: test, reip } : null;
        }).filter(Boolean);
      }
      for (const [i, r] of mapRows.entries()) {
        r.from = inputs[`map:${i}:from`]?.value ?? r.from;
        r.to = inputs[`map:${i}:to`]?.value ?? r.to;
      }
      model.settings.network_mappings = mappings();
    } else if (step === 3) {
      const s = model.settings;
      s.rpo_target_secs = num(v('rpo'));
      s.journal_history_secs = Math.round(num(v('history')) * 3600);
      s.journal_hard_limit_bytes = Math.round(num(v('hard')) * 1024 ** 3);
      s.journal_warning_bytes = Math.round(num(v('warn')) * 1024 ** 3);
      s.checkpoint_interval_ms = Math.round(num(v('interval')) * 1000);
      s.compression = inputs.compression.checked;
      s.priority = v('priority');
      s.test_reminder_days = num(v('reminder'));
      const mode = v('resync');
      s.resync_policy = mode === 'window' ? { mode, start: v('win_start'), end: v('win_end') } : { mode };
      s.failover_network = v('vpg_failover') || null;
      s.test_network = v('vpg_test') || null;
    }
  }

  // ---- rendering ---------------------------------------------------------------------
  function input(key, attrs, labelText, hint) {
    const el = h(attrs.tag || 'input', { id: `w-${key.replace(/[^a-z0-9_-]/gi, '_')}`, name: key, ...attrs, tag: null });
    inputs[key] = el;
    return field(labelText, el, hint);
  }

  function memberCard(m, recHosts) {
    const vm = candidates.find((c) => c.id === m.vm_id);
    const name = vm?.name ?? m.vm_id;
    const hostSel = h('select', { id: `w-host-${m.vm_id}` }, h('option', { value: '' }, 'Choose a host…'),
      recHosts.map((x) => h('option', { value: x.id, selected: x.id === m.recovery_host_id }, `${x.name} (${label('connectivity', x.connectivity)})`)));
    inputs[`${m.vm_id}:host`] = hostSel;
    const mk = (f, attrs) => { const el = h('input', { id: `w-${f}-${m.vm_id}`, ...attrs }); inputs[`${m.vm_id}:${f}`] = el; return el; };
    return h('div', { class: 'member card', dataset: { vm: name } }, h('h3', {}, name),
      h('div', { class: 'grid-fields' },
        field(`Recovery host for ${name}`, hostSel),
        field('Recovery storage path', mk('storage', { value: m.recovery_storage_path || '', placeholder: 'Host default', autocomplete: 'off' }),
          'Journal and replica disks on the recovery host.'),
        field('Boot group', mk('boot_group', { type: 'number', inputmode: 'numeric', value: String(m.boot_group) }), 'Lowest starts first.'),
        field('Boot delay (s)', mk('boot_delay', { type: 'number', inputmode: 'numeric', value: String(m.boot_delay_secs) })),
        field('Failover network', mk('failover', { value: m.failover_network || '', placeholder: 'VPG default' })),
        field('Test network', mk('test', { value: m.test_network || '', placeholder: 'VPG default' }))),
      (vm?.nics || []).map((n) => nicBlock(m, n)));
  }

  /** One NIC: its failover and test networks, and an optional re-IP folded in a <details>. */
  function nicBlock(m, n) {
    const set = m.nics.find((x) => x.nic === n.name) || {};
    const r = set.reip || null;
    const base = `w-nic-${safeId(m.vm_id)}-${safeId(n.name)}`;
    const mk = (f, id, attrs) => {
      const el = h('input', { id, ...attrs });
      inputs[`${m.vm_id}:nic:${n.name}:${f}`] = el;
      return el;
    };
    const now = [n.network ? `now on ${n.network}` : null, n.addresses?.length ? n.addresses.join(', ') : null].filter(Boolean).join(' · ');
    // The fold's summary shows the re-IP as typed, so a closed fold still tells it.
    const shown = h('span', { class: 'muted' }, r ? ` ${reipText(r)}` : '');
    const typed = () => {
      const val = (f) => inputs[`${m.vm_id}:nic:${n.name}:${f}`]?.value.trim() || '';
      const dns = val('dns').split(',').map((d) => d.trim()).filter(Boolean);
      shown.textContent = val('addr') ? ` ${reipText({ address: val('addr'), prefix: val('prefix') || '?', gateway: val('gw'), dns })}` : '';
    };
    return h('div', { class: 'nic', dataset: { nic: n.name } },
      h('h4', {}, `NIC ${n.name}`, now ? h('span', { class: 'muted' }, ` ${now}`) : null),
      h('div', { class: 'grid-fields' },
        field(`NIC ${n.name} failover network`, mk('failover', base, { value: set.failover_network || '', placeholder: 'VM default' })),
        field(`NIC ${n.name} test network`, mk('test', `${base}-test`, { value: set.test_network || '', placeholder: 'VM default' }))),
      h('details', { class: 'reip', open: !!r, oninput: typed },
        h('summary', {}, `Re-IP ${n.name}`, shown),
        h('p', { class: 'hint' }, 'An empty address keeps the network mappings (or the NIC\'s own address).'),
        h('div', { class: 'grid-fields' },
          field(`${n.name} re-IP address`, mk('addr', `${base}-addr`, { value: r?.address || '', placeholder: '10.201.4.20', autocomplete: 'off' })),
          field(`${n.name} prefix length`, mk('prefix', `${base}-prefix`, { type: 'number', inputmode: 'numeric', min: 1, max: 128, value: Number.isFinite(r?.prefix) ? String(r.prefix) : '', placeholder: '24' })),
          field(`${n.name} gateway`, mk('gw', `${base}-gw`, { value: r?.gateway || '', placeholder: 'none', autocomplete: 'off' })),
          field(`${n.name} DNS servers`, mk('dns', `${base}-dns`, { value: r?.dns?.join(', ') || '', autocomplete: 'off' }), 'Comma-separated.'))));
  }

  /** The VPG's network mappings: addresses in `from` are recovered into `to`. */
  function mappingsFieldset() {
    const addBtn = h('button', { type: 'button', id: 'w-map-add', onclick: () => {
      collect();
      mapRows.push({ from: '', to: '' });
      render();
      inputs[`map:${mapRows.length - 1}:from`]?.focus();
    } }, 'Add network mapping');
    return h('fieldset', { id: 'w-mappings' }, h('legend', {}, 'Network mappings (whole VPG)'),
      h('p', { class: 'hint' }, 'Addresses in a From block are recovered into the To block, keeping the host part (CIDR, same prefix length). A NIC\'s re-IP wins.'),
      mapRows.length ? h('ol', { class: 'mappings' }, mapRows.map((r, i) => {
        const mk = (f, attrs) => { const el = h('input', { id: `w-map-${i}-${f}`, autocomplete: 'off', ...attrs }); inputs[`map:${i}:${f}`] = el; return el; };
        return h('li', { dataset: { row: String(i) } },
          field(`Mapping ${i + 1} from (CIDR)`, mk('from', { value: r.from, placeholder: '10.1.0.0/16' })),
          h('span', { class: 'arrow', 'aria-hidden': 'true' }, '→'),
          field(`Mapping ${i + 1} to (CIDR)`, mk('to', { value: r.to, placeholder: '10.201.0.0/16' })),
          h('button', { type: 'button', class: 'remove', onclick: () => {
            collect();
            mapRows.splice(i, 1);
            render();
            (inputs[`map:${Math.min(i, mapRows.length - 1)}:from`] || body.querySelector('#w-map-add'))?.focus();
          } }, `Remove mapping ${i + 1}`));
      })) : h('p', { class: 'muted', id: 'no-mappings' }, 'No mapping: recovered NICs keep their addresses unless re-IP is set.'),
      addBtn);
  }

  function render() {
    replace(stepNav, STEPS.map((s, i) => h('li', { 'aria-current': i === step ? 'step' : null, class: i < step ? 'done' : '' },
      h('button', { type: 'button', class: 'link', onclick: () => go(i) }, `${i + 1}. ${s}`))));
    back.disabled = step === 0;
    next.textContent = step === STEPS.length - 1 ? (editId ? 'Save VPG' : 'Create VPG') : 'Next';
    for (const k of Object.keys(inputs)) delete inputs[k];
    const recSites = sites;
    if (step === 0) {
      replace(body, h('fieldset', {}, h('legend', {}, 'General'),
        input('name', { value: model.name, autocomplete: 'off' }, 'Name'),
        input('description', { tag: 'textarea', rows: 2, value: model.description }, 'Description'),
        input('recovery_site_id', { tag: 'select' }, 'Recovery site', 'Where the VMs are replicated to and recovered.')));
      const sel = inputs.recovery_site_id;
      sel.append(h('option', { value: '' }, 'Choose a site…'),
        ...recSites.map((s) => h('option', { value: s.id, selected: s.id === model.recovery_site_id }, s.name)));
    } else if (step === 1) {
      const usable = candidates.filter((vm) => vm.site_id !== model.recovery_site_id || model.members.has(vm.id));
      replace(body, h('fieldset', {}, h('legend', {}, 'VMs to protect'),
        h('p', { class: 'hint' }, 'VMs not yet in a VPG. All members must be at one protected site, other than the recovery site.'),
        usable.length ? h('ul', { class: 'vm-pick' }, usable.map((vm) => {
          const box = h('input', { type: 'checkbox', id: `w-vm-${vm.id}`, checked: model.members.has(vm.id) });
          inputs[`vm:${vm.id}`] = box;
          const site = sites.find((s) => s.id === vm.site_id)?.name ?? vm.site_id;
          const size = vm.disks.reduce((n, d) => n + d.size_bytes, 0);
          return h('li', {}, box, h('label', { for: box.id }, h('strong', {}, vm.name),
            h('span', { class: 'muted' }, ` ${site} · ${vm.disks.length} disk(s), ${fmtBytes(size)} · ${label('power_states', vm.power_state)}`)));
        })) : h('p', { class: 'muted', id: 'no-candidates' }, 'Every VM is already protected (or at the recovery site).')));
    } else if (step === 2) {
      const recHosts = hosts.filter((x) => x.site_id === model.recovery_site_id);
      const members = [...model.members.values()];
      replace(body, h('fieldset', {}, h('legend', {}, 'Recovery, boot order and networks per VM'),
        members.length ? members.map((m) => memberCard(m, recHosts))
          : h('p', { class: 'muted' }, 'No VM chosen yet (a VPG without VMs is allowed; it reads “VPG has no VMs”).')),
      mappingsFieldset());
    } else if (step === 3) {
      const s = model.settings;
      replace(body, h('fieldset', {}, h('legend', {}, 'SLA and journal'),
        h('div', { class: 'grid-fields' },
          input('rpo', { type: 'number', inputmode: 'numeric', value: String(s.rpo_target_secs) }, 'RPO target (seconds)', '10 s to 1 day.'),
          input('history', { type: 'number', step: 'any', value: String(s.journal_history_secs / 3600) }, 'Journal history (hours)', '1 hour to 30 days.'),
          input('hard', { type: 'number', step: 'any', value: String(+(s.journal_hard_limit_bytes / 1024 ** 3).toFixed(3)) }, 'Journal hard limit (GiB)'),
          input('warn', { type: 'number', step: 'any', value: String(+(s.journal_warning_bytes / 1024 ** 3).toFixed(3)) }, 'Journal warning (GiB)', 'Below the hard limit.'),
          input('interval', { type: 'number', step: 'any', value: String(s.checkpoint_interval_ms / 1000) }, 'Checkpoint interval (seconds)'),
          input('priority', { tag: 'select' }, 'Priority'),
          input('reminder', { type: 'number', value: String(s.test_reminder_days) }, 'Failover test reminder (days, 0 = off)'),
          input('resync', { tag: 'select' }, 'Resync policy'),
          input('win_start', { type: 'time', value: s.resync_policy.start || '22:00' }, 'Window start'),
          input('win_end', { type: 'time', value: s.resync_policy.end || '06:00' }, 'Window end'),
          input('vpg_failover', { value: s.failover_network || '' }, 'Failover network (VPG default)'),
          input('vpg_test', { value: s.test_network || '' }, 'Test network (VPG default)')),
        h('div', { class: 'field check' }, (() => { const c = h('input', { type: 'checkbox', id: 'w-compression', checked: s.compression }); inputs.compression = c; return c; })(),
          h('label', { for: 'w-compression' }, 'Compress replication traffic'))));
      inputs.priority.append(...values('priorities').map((p) => h('option', { value: p.id, selected: p.id === s.priority }, p.label)));
      inputs.resync.append(...values('resync_modes').map((p) => h('option', { value: p.id, selected: p.id === s.resync_policy.mode }, p.label)));
      const showWin = () => {
        const on = inputs.resync.value === 'window';
        inputs.win_start.closest('.field').hidden = !on;
        inputs.win_end.closest('.field').hidden = !on;
      };
      inputs.resync.addEventListener('change', showWin);
      showWin();
    } else {
      const req = requestBody();
      const site = (id) => sites.find((s) => s.id === id)?.name ?? (id || '–');
      const host = (id) => hosts.find((x) => x.id === id)?.name ?? (id || 'none (Needs configuration)');
      replace(body, h('section', { 'aria-label': 'Review' },
        h('dl', { class: 'settings' },
          [['Name', req.name], ['Recovery site', site(req.recovery_site_id)], ['VMs', String(req.members.length)],
            ['RPO target', `${req.settings.rpo_target_secs} s`], ['Journal history', `${req.settings.journal_history_secs / 3600} h`],
            ['Journal warning / limit', `${fmtBytes(req.settings.journal_warning_bytes)} / ${fmtBytes(req.settings.journal_hard_limit_bytes)}`],
            ['Priority', label('priorities', req.settings.priority)]]
            .map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v)))),
        req.members.length ? h('ul', { id: 'review-members' }, req.members.map((m) => h('li', { dataset: { vm: m.vm_id } },
          h('strong', {}, candidates.find((c) => c.id === m.vm_id)?.name ?? m.vm_id),
          ` → ${host(m.recovery_host_id)}, boot group ${m.boot_group}, delay ${m.boot_delay_secs} s; `,
          `networks: failover ${m.failover_network || 'VPG default'}, test ${m.test_network || 'VPG default'}; `,
          `storage ${m.recovery_storage_path || 'host default'}`,
          m.nics.length ? h('ul', {}, m.nics.map((n) => h('li', { dataset: { nic: n.nic } },
            `${n.nic}: failover ${n.failover_network || 'VM default'}, test ${n.test_network || 'VM default'}`,
            n.reip ? `, re-IP ${reipText(n.reip)}` : ''))) : null))) : null,
        h('h3', {}, 'Network mappings'),
        req.settings.network_mappings?.length
          ? h('ul', { id: 'review-mappings' }, req.settings.network_mappings.map((mp) => h('li', {}, `${mp.from} → ${mp.to}`)))
          : h('p', { class: 'muted', id: 'review-mappings' }, 'None.'),
        h('p', { class: 'hint' }, 'The manager checks everything when you submit; its messages show above.')));
    }
    markField();
  }

  let lastError = null;
  let lastReq = null; // the body the manager answered: its indices name members and NICs
  function markField() {
    for (const el of body.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
    const f = fieldOf(lastError);
    if (!f) return;
    const map = { 'settings.rpo_target_secs': 'rpo', 'settings.journal_history_secs': 'history', 'settings.journal_hard_limit_bytes': 'hard',
      'settings.journal_warning_bytes': 'warn', 'settings.checkpoint_interval_ms': 'interval', 'settings.test_reminder_days': 'reminder',
      'settings.failover_network': 'vpg_failover', 'settings.test_network': 'vpg_test', name: 'name', recovery_site_id: 'recovery_site_id' };
    const els = [inputs[map[f]]];
    const mem = /^members\[(\d+)\]\.(.+)$/.exec(f);
    const member = mem && lastReq?.members[Number(mem[1])];
    if (member) els.push(inputs[memberInputKey(member, mem[2])]);
    const mp = /^settings\.network_mappings\[(\d+)\](?:\.(from|to))?/.exec(f);
    if (mp) {
      // The k-th mapping sent is the k-th non-empty row shown.
      const row = mapRows.map((r, i) => [r, i]).filter(([r]) => r.from.trim() || r.to.trim())[Number(mp[1])]?.[1];
      if (row !== undefined) for (const side of mp[2] ? [mp[2]] : ['from', 'to']) els.push(inputs[`map:${row}:${side}`]);
    }
    for (const el of els) {
      if (!el) continue;
      el.setAttribute('aria-invalid', 'true');
      el.setAttribute('aria-errormessage', 'wizard-error');
      const fold = el.closest('details');
      if (fold) fold.open = true;
    }
  }

  function requestBody() {
    return {
      name: model.name,
      description: model.description,
      recovery_site_id: model.recovery_site_id,
      settings: { ...model.settings, network_mappings: mappings() },
      members: [...model.members.values()],
    };
  }

  async function submit() {
    collect();
    const req = requestBody();
    lastReq = structuredClone(req);
    next.disabled = true;
    replace(errSlot);
    lastError = null;
    try {
      const v = editId
        ? await api(`/vpgs/${editId}`, { method: 'PUT', body: { ...req, protected_site_id: existing.protected_site_id }, headers: { 'If-Match': `"${existing.version}"` } })
        : await api('/vpgs', { method: 'POST', body: req });
      ctx.navigate(`#/vpgs/${v.id}`);
    } catch (err) {
      lastError = err instanceof ApiError ? err : new ApiError(0, { detail: String(err) });
      replace(errSlot, problemBox(lastError));
      const target = stepOfField(fieldOf(lastError));
      if (target !== null && target !== step) { step = target; render(); } else markField();
      errSlot.scrollIntoView({ block: 'nearest' });
      (body.querySelector('[aria-invalid="true"]') || errSlot).focus?.();
    } finally {
      next.disabled = false;
    }
  }

  async function load() {
    replace(body, h('p', { class: 'muted' }, 'Loading inventory…'));
    try {
      const [s, hs, free, lk] = await Promise.all([listAll('/sites'), listAll('/hosts'), listAll('/vms?protected=false'),
        editId ? api(`/vpgs/${editId}`) : Promise.resolve(null)]);
      sites = s.sort((a, b) => a.name.localeCompare(b.name));
      hosts = hs.sort((a, b) => a.name.localeCompare(b.name));
      candidates = free.sort((a, b) => a.name.localeCompare(b.name));
      if (lk) {
        existing = lk;
        model.name = lk.name;
        model.description = lk.description;
        model.recovery_site_id = lk.recovery_site_id;
        model.settings = structuredClone(lk.settings);
        const memberVms = await Promise.all((lk.members || []).map((m) => api(`/vms/${m.vm_id}`)));
        candidates = [...memberVms, ...candidates.filter((c) => !lk.protected_site_id || c.site_id === lk.protected_site_id)];
        for (const m of lk.members || []) {
          const { vm_name: _n, replication_state: _r, ...settings } = m;
          model.members.set(m.vm_id, settings);
        }
      } else {
        model.settings = await defaultSettings();
      }
    } catch (err) {
      replace(errSlot, problemBox(err));
      return;
    }
    mapRows = (model.settings.network_mappings || []).map((mp) => ({ from: mp.from, to: mp.to }));
    render();
  }

  load();
  return {};
}

/** The manager's defaults for VPG settings, from its OpenAPI document (each field's `default`). */
async function defaultSettings() {
  const res = await fetch('/api/v1/openapi.json');
  if (!res.ok) throw new ApiError(res.status, { title: 'OpenAPI document unavailable', detail: 'cannot read the default VPG settings' });
  const props = (await res.json()).components?.schemas?.VpgSettings?.properties || {};
  const out = {};
  for (const [k, v] of Object.entries(props)) {
    if (!('default' in v)) throw new ApiError(0, { title: 'No default', detail: `the manager publishes no default for settings.${k}` });
    out[k] = structuredClone(v.default);
  }
  return out;
}
