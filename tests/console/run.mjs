// Browser test of the Bulwark web console, started by tests/console.rs against a running
// `bulwark demo`. Env: BULWARK_URL (manager base URL), BULWARK_TOKEN (admin token),
// CHROMIUM (default /usr/bin/chromium), ARTIFACTS (directory for screenshots: the
// operation dialog, a running failover test, and the pages at a failure).
//
// Recovery operations: as the admin, a failover test is started from the VPG page's
// dialog (Esc cancels it first; a 409 from the manager is shown in it), the page shows it
// testing with its steps, progress, countdown and recovered VMs as REST has them; it is
// stopped from the page, the VPG is back to Meeting SLA and the "failover_test" report is
// listed and opened. The viewer sees no operation button.
//
// The browser reaches the manager through a small TCP proxy in this process, so the test
// can cut the network under the page (the live stream drops) and bring it back.
// Every wait is bounded; the first failed check screenshots the page and exits 1.

import net from 'node:net';
import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import { chromium } from 'playwright-core';

const BASE = (process.env.BULWARK_URL || '').replace(/\/$/, '');
const TOKEN = process.env.BULWARK_TOKEN || '';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = process.env.ARTIFACTS || fs.mkdtempSync(path.join(os.tmpdir(), 'console-shots-'));
const WAIT = 15_000;
if (!BASE || !TOKEN) {
  console.error('BULWARK_URL and BULWARK_TOKEN must be set');
  process.exit(2);
}
const started = Date.now();
const log = (...a) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)} s]`, ...a);

// ---- REST helpers (straight to the manager, not through the proxy) ----------------------
async function rest(method, p, body, token = TOKEN) {
  const res = await fetch(`${BASE}/api/v1${p}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${p}: HTTP ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}
const get = (p) => rest('GET', p);

function assert(cond, msg) {
  if (!cond) throw new Error(`assertion failed: ${msg}`);
}

/** Polls `fn` until it returns a truthy value or `ms` pass. */
async function until(what, fn, ms = WAIT) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) { last = e; }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
}

// ---- the proxy -----------------------------------------------------------------------
const target = new URL(BASE);
const sockets = new Set();
let proxyUp = true;
const proxy = net.createServer((client) => {
  if (!proxyUp) { client.destroy(); return; }
  const upstream = net.connect(Number(target.port), target.hostname);
  sockets.add(client); sockets.add(upstream);
  const drop = () => { client.destroy(); upstream.destroy(); sockets.delete(client); sockets.delete(upstream); };
  client.on('error', drop); upstream.on('error', drop);
  client.on('close', drop); upstream.on('close', drop);
  client.pipe(upstream); upstream.pipe(client);
});
await new Promise((r) => proxy.listen(0, '127.0.0.1', r));
const URL_ = `http://127.0.0.1:${proxy.address().port}/`;
function cut() { proxyUp = false; for (const s of sockets) s.destroy(); sockets.clear(); }
function restore() { proxyUp = true; }

// ---- the browser ----------------------------------------------------------------------
// Playwright gives the browser a fresh, temporary profile (--user-data-dir) of its own.
const browser = await chromium.launch({
  executablePath: CHROMIUM,
  timeout: 30_000,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const pages = [];
async function newPage(viewport = { width: 1280, height: 800 }, colorScheme = 'light') {
  const context = await browser.newContext({ viewport, colorScheme });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on('pageerror', (e) => { log('PAGE ERROR', e.message); pageErrors.push(e.message); });
  pages.push(page);
  return page;
}
const pageErrors = [];

let current = 'start';
async function step(name, fn) {
  current = name;
  const t = Date.now();
  await fn();
  log(`ok  ${name} (${Date.now() - t} ms)`);
}

async function signIn(page, token) {
  await page.goto(URL_);
  await page.getByLabel('API token').fill(token);
  await page.getByLabel('API token').press('Enter');
}

const stamp = Date.now().toString(36);
let failed = false;
try {
  const lookups = await get('/lookups');
  const word = (table, code) => lookups[table].find((v) => v.id === code)?.label;
  const vpgs = (await get('/vpgs')).items;
  assert(vpgs.length === 2, `the demo has 2 VPGs (got ${vpgs.length})`);
  const ny = vpgs.find((v) => v.name === 'ny-to-london');
  const ldn = vpgs.find((v) => v.name === 'london-to-ny');
  const sites = (await get('/sites')).items;
  const hosts = (await get('/hosts')).items;
  const siteId = (n) => sites.find((s) => s.name === n).id;

  const page = await newPage();
  const wsUrls = [];
  page.on('websocket', (ws) => wsUrls.push(ws.url()));

  await step('a bad token shows the manager\'s error', async () => {
    await signIn(page, 'bwk_not_a_token');
    const problem = page.locator('.problem[role=alert]');
    await problem.waitFor();
    const text = await problem.textContent();
    assert(/Unauthorized/.test(text) && /unknown, revoked or expired/.test(text), `problem text: ${text}`);
    assert(await page.locator('#role').count() === 0, 'no role shown after a bad token');
  });

  await step('sign-in with the admin token shows the role', async () => {
    await page.getByLabel('API token').fill(TOKEN);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.locator('#role').waitFor();
    assert((await page.locator('#role').textContent()) === 'admin', 'role admin');
    await page.locator('#stream-state[data-state=live]').waitFor();
  });

  await step('dashboard counts the 2 VPGs by status, as REST does', async () => {
    await until('dashboard counts equal to REST', async () => {
      const rest2 = (await get('/vpgs')).items;
      const want = {};
      for (const v of rest2) want[v.status] = (want[v.status] || 0) + 1;
      const got = await page.$$eval('#vpg-counts li', (lis) => Object.fromEntries(lis.map((li) => [li.dataset.status, Number(li.dataset.count)])));
      const total = await page.locator('#vpg-total').textContent();
      return total === '2' && Object.entries(want).every(([k, n]) => got[k] === n) && Object.values(got).reduce((a, b) => a + b, 0) === 2;
    });
    const label = await page.locator('#vpg-counts li[data-status=meeting_sla] .badge').textContent();
    assert(label === word('vpg_statuses', 'meeting_sla'), `status word ${label}`);
  });

  await step('dashboard: write throughput of the demo\'s guests, from the stream', async () => {
    // The demo's guests write in bursts; within 20 s the sum is above zero, shown in
    // words and as the all-VPG line, and the busiest VPGs are listed.
    await until('throughput above zero', async () => Number(await page.locator('#throughput-total').getAttribute('data-bytes')) > 0, 20_000);
    const text = await page.locator('#throughput-total').textContent();
    assert(/^\d+(\.\d)? (B|KiB|MiB|GiB)\/s$/.test(text), `throughput in words: ${text}`);
    assert(/\d+ IOPS/.test(await page.locator('#iops-total').textContent()), 'IOPS shown');
    await until('the throughput line has points', async () =>
      Number(await page.locator('#d-throughput ~ p svg.spark').getAttribute('data-points')) > 1, 10_000);
    await page.locator('#busiest a').first().waitFor();
  });

  const vmName = `console-vm-${stamp}`;
  let vm;
  await step('dashboard updates live, without reloading', async () => {
    await page.evaluate(() => { window.__noReload = true; });
    const rpo0 = await page.locator('[data-rpo-for="ny-to-london"]').textContent();
    await until('the RPO figure to move', async () => (await page.locator('[data-rpo-for="ny-to-london"]').textContent()) !== rpo0);
    // A new VM (needed by the wizard later) makes an event that arrives on the stream.
    const host = hosts.find((x) => x.name === 'ny-esx-01');
    vm = await rest('POST', '/vms', { host_id: host.id, name: vmName, disks: [{ name: `${vmName}-disk0`, size_bytes: 16 << 20 }],
      nics: [{ name: 'eth0', network: 'ny-prod', addresses: ['10.1.4.20/24'] }] });
    await page.locator('#recent-events', { hasText: vmName }).waitFor();
    assert(await page.evaluate(() => window.__noReload === true), 'the page did not reload');
  });

  await step('the stream drops, the page says so, then reconnects with since', async () => {
    const before = wsUrls.length;
    cut();
    await page.locator('#stream-state[data-state=disconnected]').waitFor();
    assert(/Disconnected/.test(await page.locator('#stream-state').textContent()), 'disconnected shown');
    await page.waitForTimeout(1500);
    restore();
    await page.locator('#stream-state[data-state=live]').waitFor({ timeout: 20_000 });
    const again = wsUrls.slice(before);
    assert(again.some((u) => /[?&]since=\d+/.test(u)), `reconnected with since: ${again.join(', ')}`);
    const rpo0 = await page.locator('[data-rpo-for="ny-to-london"]').textContent();
    await until('live figures after the reconnect', async () => (await page.locator('[data-rpo-for="ny-to-london"]').textContent()) !== rpo0);
    assert(await page.evaluate(() => window.__noReload === true), 'the page did not reload');
  });

  await step('VPG list: exact status words, sort, filter', async () => {
    await page.getByRole('link', { name: 'VPGs', exact: true }).first().click();
    await until('2 rows', async () => (await page.locator('#vpg-table tbody tr[data-vpg]').count()) === 2);
    await until('status words equal to REST', async () => {
      for (const v of (await get('/vpgs')).items) {
        const row = page.locator(`#vpg-table tr[data-vpg="${v.name}"]`);
        const st = await row.locator('.badge').first().textContent();
        const sub = word('vpg_sub_statuses', v.sub_status);
        const subShown = await row.locator('.substatus').count() ? await row.locator('.substatus').textContent() : '';
        if (st !== word('vpg_statuses', v.status) || subShown !== sub) return false;
      }
      return true;
    });
    await until('a throughput figure per VPG', async () =>
      (await page.$$eval('#vpg-table td[data-label=Throughput]', (tds) => tds.filter((t) => /\/s · \d/.test(t.textContent)).length)) === 2);
    const order = () => page.$$eval('#vpg-table tbody tr[data-vpg]', (rows) => rows.map((r) => r.dataset.vpg));
    await page.locator('button.sort[data-sort=vms]').click();
    assert(JSON.stringify(await order()) === JSON.stringify(['london-to-ny', 'ny-to-london']), `VMs ascending: ${await order()}`);
    assert(await page.locator('th[aria-sort=ascending] button[data-sort=vms]').count() === 1, 'aria-sort ascending');
    await page.locator('button.sort[data-sort=vms]').click();
    assert(JSON.stringify(await order()) === JSON.stringify(['ny-to-london', 'london-to-ny']), `VMs descending: ${await order()}`);
    await page.getByLabel('Name contains').fill('london-to');
    await until('filter by name', async () => JSON.stringify(await order()) === JSON.stringify(['london-to-ny']));
    await page.getByLabel('Name contains').fill('');
    await page.getByLabel('Status').selectOption('not_meeting_sla');
    const expect = (await get('/vpgs')).items.filter((v) => v.status === 'not_meeting_sla').length;
    await until('filter by status', async () => (await order()).length === expect);
    await page.getByLabel('Status').selectOption('');
    await page.getByLabel('Site').selectOption(siteId('london'));
    await until('filter by site keeps both (each touches london)', async () => (await order()).length === 2);
    await page.getByLabel('Site').selectOption('');
    // Keyboard focus survives the live re-renders (several per second).
    await page.locator('#vpg-table a', { hasText: 'ny-to-london' }).focus();
    await page.waitForTimeout(1500);
    const focused = await page.evaluate(() => [document.activeElement?.tagName, document.activeElement?.textContent]);
    assert(focused[0] === 'A' && focused[1] === 'ny-to-london', `focus kept on the row link: ${focused}`);
  });

  await step('a status change on the server is on the page within a second, without reload', async () => {
    // Pausing london-to-ny: the manager's status becomes "User paused protection"; the
    // list must show it at most a second after REST does.
    await page.evaluate(() => { window.__noReload = true; });
    const row = page.locator('#vpg-table tr[data-vpg="london-to-ny"]');
    const shown = row.locator('.substatus[data-sub-status=user_paused_protection]');
    await rest('POST', `/vpgs/${ldn.id}/pause`);
    const onServer = await until('paused on the server', async () =>
      (await get(`/vpgs/${ldn.id}`)).sub_status === 'user_paused_protection' && Date.now(), 10_000);
    await shown.waitFor({ timeout: 5_000 });
    const lag = Date.now() - onServer;
    log(`    status on the page ${lag} ms after REST had it`);
    assert(lag <= 1000, `the page showed the status ${lag} ms after the server had it`);
    assert((await shown.textContent()) === word('vpg_sub_statuses', 'user_paused_protection'), 'the manager\'s words');
    await rest('POST', `/vpgs/${ldn.id}/resume`);
    await until('resumed on the page', async () => (await shown.count()) === 0, 10_000);
    assert(await page.evaluate(() => window.__noReload === true), 'the page did not reload');
  });

  await step('VPG detail: VMs with replication states, checkpoints, tagging from the UI', async () => {
    await page.locator('#vpg-table a', { hasText: 'ny-to-london' }).click();
    await page.locator('#vpg-name', { hasText: 'ny-to-london' }).waitFor();
    const detail = await get(`/vpgs/${ny.id}`);
    await until('the member VMs', async () => (await page.locator('#vm-table tbody tr').count()) === detail.members.length);
    for (const m of detail.members) {
      const badge = await page.locator(`#vm-table tr[data-vm="${m.vm_name}"] .badge[data-state]`).textContent();
      assert(badge === word('vm_replication_states', m.replication_state), `${m.vm_name}: ${badge}`);
    }
    // Each disk's live figures from GET /vpgs/{id}/disks: mode in the manager's words,
    // lag, write rate; the same disks REST lists.
    const disks = await get(`/vpgs/${ny.id}/disks`);
    assert(disks.length >= detail.members.length && disks.every((d) => d.reported), `REST disks ${JSON.stringify(disks).slice(0, 300)}`);
    await until('every disk with its figures', async () => {
      for (const d of disks) {
        const li = page.locator(`#vm-table li[data-disk="${d.disk_name}"]`);
        if (!(await li.count())) return false;
        const mode = await li.locator('[data-mode]').textContent().catch(() => null);
        if (mode !== word('replication_modes', d.mode)) return false;
        if (!/lag \d/.test(await li.textContent()) || !(await li.locator('[data-throughput]').count())) return false;
      }
      return true;
    });
    await until('a disk being written shows a rate', async () =>
      (await page.$$eval('#vm-table [data-throughput]', (els) => els.some((e) => Number(e.dataset.throughput) > 0))), 20_000);
    assert(/IOPS/.test(await page.locator('#vpg-throughput').textContent()), 'the VPG\'s throughput in the summary');
    await until('checkpoints listed', async () => (await page.locator('#cp-table tbody tr').count()) > 0);
    assert(await page.locator('.timeline .tick').count() > 0, 'timeline ticks');
    assert(await page.locator('#vpg-ops').count() === 1, 'a place for operations in the header');
    const tag = `console-${stamp}`;
    await page.getByLabel('Tag', { exact: true }).fill(tag);
    await page.getByRole('button', { name: 'Tag checkpoint' }).click();
    await page.locator('#tag-status', { hasText: tag }).waitFor();
    const tagged = (await get(`/vpgs/${ny.id}/checkpoints?tagged=true`)).items;
    assert(tagged.some((c) => c.tag === tag), `REST lists tag ${tag}`);
    await page.locator(`#cp-table tr[data-tag="${tag}"]`).waitFor();
    await page.locator('.timeline .tag', { hasText: tag }).waitFor();
    // An empty tag: the manager's own message.
    await page.getByLabel('Tag', { exact: true }).fill('');
    await page.getByRole('button', { name: 'Tag checkpoint' }).click();
    await page.locator('#tag-form .problem').waitFor();
    const hist = await page.locator('#rpo-chart svg.chart, #rpo-history-empty').first();
    await hist.waitFor();
    log(`    RPO history: ${await page.locator('#rpo-chart svg.chart').count() ? 'chart drawn' : 'no samples stored yet ("No RPO history yet.")'}`);
  });

  await step('recovery operations: failover test started and stopped from the console', async () => {
    // Still on ny-to-london's page (the previous step).
    const members = (await get(`/vpgs/${ny.id}`)).members;
    const testBtn = page.locator('#vpg-ops #op-test');
    await testBtn.and(page.locator(':enabled')).waitFor();
    for (const b of ['#op-failover', '#op-move', '#op-pause', '#op-force-sync']) {
      assert(await page.locator(`#vpg-ops ${b}`).count() === 1, `button ${b} shown to the admin`);
    }
    assert(await page.locator('#vpg-ops #op-stop-test, #vpg-ops #op-commit, #vpg-ops #op-rollback').count() === 0,
      'no Stop test / Commit / Rollback while nothing runs');

    // The dialog: labelled, Esc cancels and gives the focus back to the button.
    const testTasks = async () => (await get(`/tasks?vpg=${ny.id}&limit=200`)).items.filter((t) => t.kind === 'failover_test').length;
    const before = await testTasks();
    await testBtn.click();
    const dlg = page.getByRole('dialog', { name: 'Test failover of ny-to-london' });
    await dlg.waitFor();
    await dlg.getByLabel('Checkpoint').waitFor();
    await until('recoverable checkpoints in the picker', async () => (await dlg.locator('select[name=checkpoint] optgroup option').count()) > 0);
    assert(await dlg.getByLabel('web-01').isChecked(), 'every VM is tested by default');
    await page.screenshot({ path: path.join(ARTIFACTS, 'ops-dialog.png') });
    await page.keyboard.press('Escape');
    await dlg.waitFor({ state: 'detached' });
    // (The header may re-render in the same instant; the focus follows within a frame.)
    await until('focus back on Test failover after Esc', async () => (await page.evaluate(() => document.activeElement?.id)) === 'op-test', 2_000);
    assert(await testTasks() === before, 'Esc started nothing');

    // The manager's refusal is shown in the dialog: a test started elsewhere meanwhile.
    await testBtn.click();
    await dlg.waitFor();
    const other = await rest('POST', `/vpgs/${ny.id}/failover-test`, { notes: 'started behind the dialog' });
    await dlg.getByRole('button', { name: 'Start test' }).click();
    const problem = dlg.locator('.problem[role=alert]');
    await problem.waitFor();
    assert((await problem.getAttribute('data-code')) === 'vpg.operation_running', `problem code ${await problem.getAttribute('data-code')}`);
    await dlg.getByRole('button', { name: 'Cancel' }).click();
    await dlg.waitFor({ state: 'detached' });
    await until('the other test to be testing', async () => (await get(`/tasks/${other.id}`)).state === 'waiting', 30_000);
    await rest('POST', `/vpgs/${ny.id}/failover-test/stop`, {});
    await until('the other test to end', async () => (await get(`/tasks/${other.id}`)).finished_at, 30_000);
    await testBtn.and(page.locator(':enabled')).waitFor({ timeout: 20_000 });

    // Start from the console: the VPG reaches the test state, the progress shows live.
    await testBtn.click();
    await dlg.waitFor();
    await dlg.getByLabel('Checkpoint').selectOption('latest');
    await dlg.getByLabel('Notes').fill(`console test ${stamp}`);
    await dlg.getByRole('button', { name: 'Start test' }).click();
    await dlg.waitFor({ state: 'detached' });
    // The panel of the test stopped above may still be shown: wait for the new task's.
    const panel = page.locator(`#op-progress[data-kind=failover_test]:not([data-task="${other.id}"])`);
    await panel.waitFor({ timeout: 15_000 });
    const taskId = await panel.getAttribute('data-task');
    assert(taskId, 'the new task is on the page');
    await page.locator('#op-progress[data-state=waiting]').waitFor({ timeout: 30_000 });
    await page.locator('#vpg-status .substatus[data-sub-status=testing_failover]').waitFor({ timeout: 20_000 });
    const task = await get(`/tasks/${taskId}`);
    assert(task.state === 'waiting' && task.kind === 'failover_test', `REST task ${task.state} ${task.kind}`);
    const rows = await page.$$eval('#op-steps li', (lis) => lis.map((li) => [li.dataset.step, li.dataset.state]));
    assert(JSON.stringify(rows) === JSON.stringify(task.steps.map((st) => [st.name, st.state])), `steps as REST: ${JSON.stringify(rows)}`);
    const pct = Number(await page.locator('#op-progress [role=progressbar]').getAttribute('aria-valuenow'));
    assert(pct === Math.round(task.progress), `progress ${pct} = ${task.progress}`);
    await page.locator('#op-countdown', { hasText: 'stops by itself' }).waitFor();
    await until('the recovered VMs listed', async () => (await page.locator('#op-recovered li').count()) === members.length);
    assert(await page.locator('#op-recovered li', { hasText: 'web-01 - Test' }).count() === 1, 'web-01 - Test recovered');
    for (const b of ['#op-failover', '#op-move', '#op-pause', '#op-force-sync']) {
      assert(await page.locator(`#vpg-ops ${b}`).isDisabled(), `${b} disabled while the test runs`);
    }
    await page.screenshot({ path: path.join(ARTIFACTS, 'ops-test-running.png'), fullPage: true });
    // The events and tasks page shows the same task, its progress on the same 0–100 scale,
    // and it is on the dashboard among the tasks not finished.
    assert(task.progress > 0 && task.progress < 100, `a test waiting for stop is part-way: ${task.progress}`);
    const ev = await newPage();
    await signIn(ev, TOKEN);
    await ev.locator('#role').waitFor();
    await ev.locator(`#recent-events, #d-tasks`).first().waitFor();
    await ev.locator(`.tasks li[data-task="${taskId}"]`).waitFor();
    await ev.goto(`${URL_}#/events`);
    const taskRow = ev.locator(`#task-table tr[data-task="${taskId}"]`);
    await taskRow.waitFor();
    assert((await taskRow.locator('th').textContent()) === 'Failover test', `task kind in words: ${await taskRow.locator('th').textContent()}`);
    const evPct = Number(await taskRow.locator('[role=progressbar]').getAttribute('aria-valuenow'));
    assert(evPct === Math.round(task.progress), `events page progress ${evPct} = ${task.progress}`);
    await ev.context().close();

    // Stop from the console: back to Meeting SLA, and a failover_test report.
    await page.locator('#vpg-ops #op-stop-test').click();
    const stopDlg = page.getByRole('dialog', { name: 'Stop the failover test of ny-to-london' });
    await stopDlg.getByLabel('Passed').check();
    await stopDlg.getByRole('button', { name: 'Stop test' }).click();
    await stopDlg.waitFor({ state: 'detached' });
    await page.locator(`#op-progress[data-task="${taskId}"][data-state=succeeded]`).waitFor({ timeout: 30_000 });
    await until('ny-to-london Meeting SLA again, no test', async () => {
      const st = await page.locator('#vpg-status .badge').first().getAttribute('data-status');
      const sub = await page.locator('#vpg-status .substatus').count();
      return st === 'meeting_sla' && sub === 0;
    }, 30_000);
    await testBtn.and(page.locator(':enabled')).waitFor();
    const row = page.locator('#vpg-report-table tr[data-kind=failover_test][data-result=stopped]').first();
    await row.waitFor();
    const reports = (await get(`/reports?vpg=${ny.id}`)).items;
    const mine = reports.find((r) => r.details?.operation === taskId);
    assert(mine && mine.kind === 'failover_test' && mine.result === 'stopped' && mine.details.test_result === 'passed', `REST report ${JSON.stringify(mine)?.slice(0, 200)}`);
    await page.locator(`#vpg-report-table tr[data-report="${mine.id}"]`).waitFor();
    // The report's detail: each step with its timing.
    await page.locator(`#vpg-report-table tr[data-report="${mine.id}"] a`).click();
    await page.locator(`#report-detail[data-report="${mine.id}"]`).waitFor();
    assert(await page.locator('#report-steps tbody tr').count() === mine.steps.length, 'every step of the report');
    assert(/console test/.test(await page.locator('#report-detail').textContent()), 'the notes');
    await page.getByRole('link', { name: 'Reports', exact: true }).click();
    await page.locator(`#report-table tr[data-report="${mine.id}"]`).waitFor();
  });

  const vpgName = `console-vpg-${stamp}`;
  await step('wizard: the API\'s validation message, then a valid VPG', async () => {
    await page.goto(`${URL_}#/vpgs/new`);
    await page.getByLabel('Name').fill(vpgName);
    await page.getByLabel('Recovery site').selectOption(siteId('london'));
    await page.getByRole('button', { name: 'Next' }).click();
    await page.getByLabel(vmName).check();
    await page.getByRole('button', { name: 'Next' }).click();
    const ldnHost = hosts.find((x) => x.name === 'ldn-esx-01');
    await page.getByLabel(`Recovery host for ${vmName}`).selectOption(ldnHost.id);
    await page.getByLabel('Boot group').fill('2');
    await page.getByRole('button', { name: 'Next' }).click();
    const defaults = (await (await fetch(`${BASE}/api/v1/openapi.json`)).json()).components.schemas.VpgSettings.properties;
    assert((await page.getByLabel('RPO target (seconds)').inputValue()) === String(defaults.rpo_target_secs.default), 'the manager\'s default RPO target');
    await page.getByLabel('RPO target (seconds)').fill('5');
    await page.getByRole('button', { name: 'Next' }).click();
    await page.getByRole('button', { name: 'Create VPG' }).click();
    const problem = page.locator('#wizard-error .problem');
    await problem.waitFor();
    assert((await problem.getAttribute('data-code')) === 'vpg.rpo_target_out_of_range', `problem code ${await problem.getAttribute('data-code')}`);
    assert(/RPO target must be between/.test(await problem.textContent()), 'the manager\'s detail text');
    assert((await page.getByLabel('RPO target (seconds)').getAttribute('aria-invalid')) === 'true', 'the field is marked');
    assert((await get(`/vpgs?name=${vpgName}`)).items.length === 0, 'nothing created');
    await page.getByLabel('RPO target (seconds)').fill('60');

    // Per-VM and per-NIC recovery settings and the VPG's network mappings, with an
    // invalid re-IP address first: the manager's message, the NIC's input marked.
    await page.getByRole('button', { name: '3. Recovery' }).click();
    const card = page.locator(`.member[data-vm="${vmName}"]`);
    const storagePath = `/srv/bulwark/${stamp}`;
    await card.getByLabel('Recovery storage path', { exact: true }).fill(storagePath);
    await card.getByLabel('NIC eth0 test network', { exact: true }).fill('ldn-lab');
    const reipFold = card.locator('details.reip');
    assert(!(await reipFold.evaluate((d) => d.open)), 're-IP folded while unset');
    await card.getByText('Re-IP eth0').click();
    const addr = card.getByLabel('eth0 re-IP address', { exact: true });
    await addr.fill('10.201.4.300');
    await card.getByLabel('eth0 prefix length', { exact: true }).fill('24');
    await page.getByRole('button', { name: 'Add network mapping' }).click();
    assert(await page.evaluate(() => document.activeElement?.id) === 'w-map-0-from', 'focus on the new mapping row');
    await page.getByLabel('Mapping 1 from (CIDR)', { exact: true }).fill('10.1.0.0/16');
    await page.getByLabel('Mapping 1 to (CIDR)', { exact: true }).fill('10.201.0.0/16');
    await page.getByRole('button', { name: 'Add network mapping' }).click();
    await page.getByLabel('Mapping 2 from (CIDR)', { exact: true }).fill('192.168.0.0/24');
    await page.getByRole('button', { name: 'Remove mapping 2' }).click();
    assert(await page.locator('ol.mappings li').count() === 1, 'one mapping row left');
    assert((await addr.inputValue()) === '10.201.4.300', 'typed values survive adding and removing rows');
    await page.getByRole('button', { name: '5. Review' }).click();
    await page.getByRole('button', { name: 'Create VPG' }).click();
    await until('the re-IP problem', async () => (await problem.getAttribute('data-code')) === 'vpg.reip_invalid');
    const badField = await problem.locator('.meta code').first().textContent();
    assert(/^members\[0\]\.nics\[0\]\.reip\.address$/.test(badField), `problem field ${badField}`);
    assert(/10\.201\.4\.300/.test(await problem.textContent()), `the manager's detail text: ${await problem.textContent()}`);
    await page.locator('.steps li[aria-current=step]', { hasText: 'Recovery' }).waitFor();
    assert((await addr.getAttribute('aria-invalid')) === 'true', 'the NIC\'s re-IP address is marked');
    assert(await reipFold.evaluate((d) => d.open), 'the re-IP fold is open');
    assert(await page.locator('[aria-invalid=true]').count() === 1, 'only that input is marked');
    assert((await get(`/vpgs?name=${vpgName}`)).items.length === 0, 'still nothing created');
    await page.screenshot({ path: path.join(ARTIFACTS, 'wizard-recovery-error.png'), fullPage: true });
    await addr.fill('10.201.4.20');
    await card.getByLabel('eth0 gateway', { exact: true }).fill('10.201.4.1');
    await card.getByLabel('eth0 DNS servers', { exact: true }).fill('10.201.0.53, 10.201.0.54');
    assert((await card.locator('details.reip summary').textContent()) === 'Re-IP eth0 10.201.4.20/24 via 10.201.4.1, DNS 10.201.0.53, 10.201.0.54',
      `the fold's summary follows the typing: ${await card.locator('details.reip summary').textContent()}`);
    await page.screenshot({ path: path.join(ARTIFACTS, 'wizard-recovery.png'), fullPage: true });
    // Narrow: no horizontal scroll, every control labelled.
    await page.setViewportSize({ width: 390, height: 800 });
    await page.waitForTimeout(300);
    const [sw, cw] = await page.evaluate(() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]);
    assert(sw <= cw, `wizard Recovery step at 390 px: scrollWidth ${sw} > clientWidth ${cw}`);
    const unlabelled = await page.$$eval('form.wizard input, form.wizard select, form.wizard textarea, form.wizard button', (els) => els
      .filter((e) => e.offsetParent !== null)
      .filter((e) => !(e.labels?.length || e.getAttribute('aria-label') || (e.tagName === 'BUTTON' && e.textContent.trim())))
      .map((e) => e.outerHTML.slice(0, 80)));
    assert(unlabelled.length === 0, `wizard Recovery step: controls without a label: ${unlabelled.join(' | ')}`);
    await page.screenshot({ path: path.join(ARTIFACTS, 'wizard-recovery-narrow.png'), fullPage: true });
    await page.setViewportSize({ width: 1280, height: 800 });
    await page.getByRole('button', { name: '5. Review' }).click();
    const reviewed = await page.locator('#review-members').textContent();
    for (const want of [storagePath, 'ldn-lab', '10.201.4.20/24 via 10.201.4.1, DNS 10.201.0.53, 10.201.0.54']) {
      assert(reviewed.includes(want), `the review lists ${want}: ${reviewed}`);
    }
    assert((await page.locator('#review-mappings').textContent()).includes('10.1.0.0/16 → 10.201.0.0/16'), 'the review lists the mapping');
    await page.getByRole('button', { name: 'Create VPG' }).click();
    await page.locator('#vpg-name', { hasText: vpgName }).waitFor();
    const made = (await get(`/vpgs?name=${vpgName}`)).items;
    assert(made.length === 1, 'REST has the new VPG');
    const full = await get(`/vpgs/${made[0].id}`);
    assert(full.settings.rpo_target_secs === 60, `rpo target ${full.settings.rpo_target_secs}`);
    assert(full.members.length === 1 && full.members[0].vm_id === vm.id, 'the chosen VM');
    assert(full.members[0].recovery_host_id === ldnHost.id && full.members[0].boot_group === 2, 'recovery host and boot group');
    assert(full.recovery_site_id === siteId('london') && full.protected_site_id === siteId('new-york'), 'sites');
    const wantRecovery = {
      storage: storagePath,
      nics: [{ nic: 'eth0', failover_network: null, test_network: 'ldn-lab',
        reip: { address: '10.201.4.20', prefix: 24, gateway: '10.201.4.1', dns: ['10.201.0.53', '10.201.0.54'] } }],
      mappings: [{ from: '10.1.0.0/16', to: '10.201.0.0/16' }],
    };
    const recoveryOf = (v) => JSON.stringify({
      storage: v.members[0].recovery_storage_path,
      nics: v.members[0].nics.map((n) => ({ nic: n.nic, failover_network: n.failover_network ?? null, test_network: n.test_network ?? null,
        reip: n.reip && { address: n.reip.address, prefix: n.reip.prefix, gateway: n.reip.gateway ?? null, dns: n.reip.dns } })),
      mappings: v.settings.network_mappings,
    });
    assert(recoveryOf(full) === JSON.stringify(wantRecovery), `REST has exactly the recovery settings: ${recoveryOf(full)}`);
    // Edit: the same wizard, saved with PUT and If-Match.
    await page.getByRole('link', { name: 'Edit' }).click();
    await page.getByLabel('Name').waitFor();
    assert((await page.getByLabel('Name').inputValue()) === vpgName, 'the wizard starts from the VPG');
    await page.getByRole('button', { name: '3. Recovery' }).click();
    assert((await card.getByLabel('Recovery storage path', { exact: true }).inputValue()) === storagePath, 'the edit shows the storage path');
    assert((await card.getByLabel('eth0 re-IP address', { exact: true }).inputValue()) === '10.201.4.20', 'the edit shows the re-IP');
    assert((await page.getByLabel('Mapping 1 to (CIDR)', { exact: true }).inputValue()) === '10.201.0.0/16', 'the edit shows the mapping');
    await page.getByRole('button', { name: '4. SLA and journal' }).click();
    await page.getByLabel('RPO target (seconds)').fill('120');
    await page.getByRole('button', { name: 'Next' }).click();
    await page.getByRole('button', { name: 'Save VPG' }).click();
    await page.locator('#vpg-name', { hasText: vpgName }).waitFor();
    await until('REST shows the edit', async () => (await get(`/vpgs/${made[0].id}`)).settings.rpo_target_secs === 120);
    const edited = await get(`/vpgs/${made[0].id}`);
    assert(edited.members.length === 1 && edited.members[0].boot_group === 2, 'members kept by the edit');
    assert(recoveryOf(edited) === JSON.stringify(wantRecovery), `recovery settings kept by the edit: ${recoveryOf(edited)}`);
  });

  await step('VPG list: sparklines start from the manager\'s RPO history', async () => {
    const since = new Date(Date.now() - 600_000).toISOString();
    const hist = await get(`/vpgs/${ny.id}/rpo-history?since=${encodeURIComponent(since)}&max_points=600`);
    assert(hist.samples.filter((p) => p.rpo_ms !== null).length > 1, 'ny-to-london has RPO history on the server');
    // A fresh page: its live store starts empty. A point older than the page can only
    // come from the history (live samples carry the manager's time of sending).
    const sp = await newPage();
    const opened = Date.now();
    await signIn(sp, TOKEN);
    await sp.locator('#role').waitFor();
    await sp.goto(`${URL_}#/vpgs`);
    const spark = sp.locator('#vpg-table tr[data-vpg="ny-to-london"] svg.spark');
    await spark.waitFor();
    const seeded = await until('a sparkline seeded from the history', async () => {
      const n = Number(await spark.getAttribute('data-points'));
      const first = await spark.getAttribute('data-first');
      return n > 1 && first && Date.parse(first) < opened ? { n, first, after: Date.now() - opened } : false;
    }, 10_000);
    log(`    sparkline: ${seeded.n} points from ${seeded.first}, ${seeded.after} ms after the page opened`);
    // The same history draws the detail page's chart (a young demo may have one 15 s
    // bucket: a line of one point, attached but of no height).
    await sp.locator('#vpg-table a', { hasText: 'ny-to-london' }).click();
    const line = sp.locator('#rpo-chart svg.chart path.line').first();
    await line.waitFor({ state: 'attached', timeout: 20_000 });
    assert(/^M\d/.test(await line.getAttribute('d')), `the RPO chart's line: ${await line.getAttribute('d')}`);
    await sp.context().close();
  });

  // An alert the test controls: a journal warning size far below london-to-ny's journal.
  const oldWarning = ldn.settings.journal_warning_bytes;
  await rest('PATCH', `/vpgs/${ldn.id}`, { settings: { journal_warning_bytes: 1 << 20 } });
  const alert = await until('a journal size warning on london-to-ny (REST)', async () =>
    (await get(`/alerts?vpg=${ldn.id}&open=true`)).items.find((a) => a.kind === 'journal_size_warning'), 30_000);

  await step('a viewer sees no write controls', async () => {
    const created = await rest('POST', '/tokens', { name: `console-viewer-${stamp}`, role: 'viewer' });
    const vp = await newPage();
    await signIn(vp, created.secret);
    await vp.locator('#role[data-role=viewer]').waitFor();
    await vp.goto(`${URL_}#/vpgs`);
    await vp.locator('#vpg-table tbody tr[data-vpg]').first().waitFor();
    assert(await vp.locator('#new-vpg').count() === 0, 'no New VPG');
    await vp.goto(`${URL_}#/vpgs/${ny.id}`);
    await vp.locator('#vm-table').waitFor();
    assert(await vp.locator('#tag-form').count() === 0, 'no tag form');
    assert(await vp.locator('#edit-vpg').count() === 0, 'no Edit');
    await vp.locator('#vpg-report-table, #vpg-report-table-empty').first().waitFor();
    assert(await vp.locator('#vpg-ops button').count() === 0, 'no operation buttons');
    assert(await vp.locator('dialog, #op-progress button').count() === 0, 'no operation dialog or control');
    await vp.locator('#vpg-report-table tr[data-kind=failover_test]').first().waitFor();
    await vp.goto(`${URL_}#/alerts`);
    await vp.locator(`#alert-table tr[data-alert="${alert.id}"]`).waitFor();
    assert(await vp.locator('button.ack').count() === 0, 'no Acknowledge');
    await vp.goto(`${URL_}#/vpgs/new`);
    await vp.getByRole('heading', { name: 'Not allowed' }).waitFor();
    assert(await vp.locator('form.wizard').count() === 0, 'no wizard');
    // Revoked while signed in: after the next stream drop the page signs out by itself.
    await rest('DELETE', `/tokens/${created.token.id}`);
    cut();
    await vp.locator('#stream-state[data-state=disconnected]').waitFor();
    restore();
    await vp.locator('.signin .problem', { hasText: 'Unauthorized' }).waitFor({ timeout: 20_000 });
    await page.locator('#stream-state[data-state=live]').waitFor({ timeout: 20_000 });
    await vp.context().close();
  });

  await step('alerts: acknowledge from the page', async () => {
    await page.goto(`${URL_}#/alerts`);
    const row = page.locator(`#alert-table tr[data-alert="${alert.id}"]`);
    await row.waitFor();
    await row.getByRole('button', { name: /Acknowledge/ }).click();
    await row.locator('.acked', { hasText: 'bootstrap-admin' }).waitFor();
    const after = await get(`/alerts/${alert.id}`);
    assert(/bootstrap-admin/.test(after.acknowledged_by || '') && after.acknowledged_at, `REST: acknowledged by ${after.acknowledged_by}`);
  });
  await rest('PATCH', `/vpgs/${ldn.id}`, { settings: { journal_warning_bytes: oldWarning } });

  await step('events and tasks page lists the audit log', async () => {
    await page.goto(`${URL_}#/events`);
    await page.locator('#event-table tbody tr', { hasText: vpgName }).first().waitFor();
  });

  // Every page, named for its screenshot.
  const firstReport = (await get('/reports?limit=1')).items[0];
  const PAGES = [['dashboard', '#/'], ['vpgs', '#/vpgs'], ['vpg-detail', `#/vpgs/${ny.id}`], ['wizard', '#/vpgs/new'],
    ['vpg-edit', `#/vpgs/${ldn.id}/edit`], ['alerts', '#/alerts'], ['events', '#/events'], ['reports', '#/reports'],
    ...(firstReport ? [['report', `#/reports/${firstReport.id}`]] : [])];

  await step('every page at 1280×800, light and dark: a screenshot each, dark really dark', async () => {
    for (const scheme of ['light', 'dark']) {
      const sp = await newPage({ width: 1280, height: 800 }, scheme);
      await signIn(sp, TOKEN);
      await sp.locator('#role').waitFor();
      for (const [name, hash] of PAGES) {
        await sp.goto(`${URL_}${hash}`);
        await sp.locator('#stream-state[data-state=live]').waitFor();
        await sp.waitForTimeout(1500); // lists, charts and disk figures load after the stream
        await sp.screenshot({ path: path.join(ARTIFACTS, `${name}-${scheme}.png`), fullPage: true });
      }
      // The page background follows the scheme (a dark theme that is only half there
      // would leave white panels).
      const bg = await sp.evaluate(() => getComputedStyle(document.body).backgroundColor);
      const lum = bg.match(/\d+/g).slice(0, 3).map(Number).reduce((a, b) => a + b, 0) / 3;
      assert(scheme === 'dark' ? lum < 80 : lum > 175, `${scheme} background ${bg}`);
      await sp.context().close();
    }
  });

  await step('390 px wide: no horizontal scroll, every control labelled, on every page', async () => {
    const np = await newPage({ width: 390, height: 800 });
    await signIn(np, TOKEN);
    await np.locator('#role').waitFor();
    for (const [name, hash] of PAGES) {
      await np.goto(`${URL_}${hash}`);
      await np.locator('#stream-state[data-state=live]').waitFor();
      await np.waitForTimeout(700);
      await np.screenshot({ path: path.join(ARTIFACTS, `${name}-390.png`), fullPage: true });
      const [sw, cw] = await np.evaluate(() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]);
      assert(sw <= cw, `${hash}: scrollWidth ${sw} > clientWidth ${cw}`);
      const unlabelled = await np.$$eval('input, select, textarea, button', (els) => els
        .filter((e) => e.offsetParent !== null)
        .filter((e) => !(e.labels?.length || e.getAttribute('aria-label') || (e.tagName === 'BUTTON' && e.textContent.trim())))
        .map((e) => e.outerHTML.slice(0, 80)));
      assert(unlabelled.length === 0, `${hash}: controls without a label: ${unlabelled.join(' | ')}`);
    }
    await np.context().close();
  });

  assert(pageErrors.length === 0, `no uncaught page errors: ${pageErrors.join(' | ')}`);
} catch (e) {
  failed = true;
  console.error(`FAILED in "${current}": ${e.stack || e}`);
  for (const [i, p] of pages.entries()) {
    if (p.isClosed()) continue;
    const file = path.join(ARTIFACTS, `failure-${i}.png`);
    try { await p.screenshot({ path: file, fullPage: true, timeout: 5000 }); console.error(`screenshot: ${file} (${p.url()})`); } catch { /* closed */ }
  }
} finally {
  await browser.close().catch(() => {});
  proxy.close();
}
log(failed ? 'console test FAILED' : 'console test passed');
process.exit(failed ? 1 : 0);
