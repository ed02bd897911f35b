// Display words for the API's codes, from GET /api/v1/lookups (the manager owns them:
// the Zerto status and sub-status words, Hyper-V replication states, …).

import { api } from './api.js';

let tables = null;

export async function loadLookups() {
  const raw = await api('/lookups');
  tables = {};
  for (const [k, values] of Object.entries(raw)) {
    tables[k] = new Map(values.map((v) => [v.id, v]));
  }
  return tables;
}

/** The display word of `code` in lookup table `table` (the code itself if unknown). */
export function label(table, code) {
  if (code === null || code === undefined) return '';
  return tables?.[table]?.get(code)?.label ?? code;
}

export function description(table, code) {
  return tables?.[table]?.get(code)?.description ?? '';
}

/** [{id,label,description}] of a table, in the manager's order. */
export function values(table) {
  return [...(tables?.[table]?.values() ?? [])];
}
