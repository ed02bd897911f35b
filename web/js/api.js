// REST client for /api/v1: bearer token from sessionStorage, problem-details errors.

const TOKEN_KEY = 'bulwark.token';

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** An API failure carrying the RFC 7807 problem document the manager sent. */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
  get code() { return this.problem.code || ''; }
  get field() { return this.problem.field || null; }
  get title() { return this.problem.title || `HTTP ${this.status}`; }
}

/**
 * Calls the API. `body` is sent as JSON; `headers` are added (e.g. If-Match).
 * Resolves with the parsed JSON (or null for an empty body); rejects with ApiError.
 */
export async function api(path, { method = 'GET', body, headers = {}, token = getToken() } = {}) {
  const h = { Accept: 'application/json', ...headers };
  if (token) h.Authorization = `Bearer ${token}`;
  if (body !== undefined) h['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(`/api/v1${path}`, {
      method,
      headers: h,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, { title: 'Network error', detail: `the manager did not answer (${e.message})` });
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = { detail: text }; }
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

/** Every item of a paginated list (follows `next_cursor`), with a safety bound on pages. */
export async function listAll(path, { limit = 200, maxPages = 50 } = {}) {
  const items = [];
  let cursor = null;
  for (let i = 0; i < maxPages; i++) {
    const sep = path.includes('?') ? '&' : '?';
    const q = `${path}${sep}limit=${limit}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`;
    const page = await api(q);
    items.push(...page.items);
    if (!page.next_cursor) break;
    cursor = page.next_cursor;
  }
  return items;
}

/** The first page only, for lists that can be long (events, checkpoints). */
export async function listPage(path, limit = 50) {
  const sep = path.includes('?') ? '&' : '?';
  return api(`${path}${sep}limit=${limit}`);
}
