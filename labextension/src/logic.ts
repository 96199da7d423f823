/**
 * The panel's own logic, apart from the DOM and JupyterLab (unit tested in test/logic.test.ts):
 * the form's schema and uiSchema from the served config, the POST body from the form's data, and
 * durations as Slurm writes them.
 *
 * The fields are not listed here: they come from the JSON Schema the server builds from its one
 * field table (spunnel_jupyter/fields.py, `json_schema`) and serves in GET spunnel/api/config.
 */

/** One property of the served schema. */
export interface IFieldSchema {
  type: 'string' | 'integer';
  title?: string;
  description?: string;
  enum?: string[];
  default?: string | number;
  /** Example values: the form shows them as the input's placeholder. */
  examples?: (string | number)[];
  minimum?: number;
}

/** The served JSON Schema of a start request (an object of fields). */
export interface IFormSchema {
  type: 'object';
  title?: string;
  properties: Record<string, IFieldSchema>;
}

export interface IPartition {
  name: string;
  default: boolean;
  available: boolean;
  /** The partition's time limit in seconds; null when unlimited. */
  max_time: number | null;
  max_mem_mb: number;
  max_cpus: number;
  nodes: number;
}

/** GET spunnel/api/config. */
export interface IConfig {
  /** The site's defaults (already in the schema's `default`s). */
  defaults: Record<string, unknown>;
  partitions: IPartition[];
  schema: IFormSchema;
  /** Minutes before the time limit at which the user is warned. */
  warn_before?: number[];
}

/** The warnings due with `left` seconds to go that were not given yet (largest first). */
export function dueWarnings(warnBefore: number[], given: Set<number>, left: number): number[] {
  return [...new Set(warnBefore)]
    .filter(minutes => !given.has(minutes) && left <= minutes * 60)
    .sort((a, b) => b - a);
}

/** A time-limit warning, as the terminal says it. */
export function timeLimitWarning(job: number | null, left: number): string {
  const minutes = Math.max(1, Math.round(left / 60));
  return (
    `Job ${job ?? '?'} reaches its time limit in ${minutes} minute${minutes === 1 ? '' : 's'}: ` +
    'save your work (the session saves open notebooks before it ends)'
  );
}

/** One of GET spunnel/api/detached's sessions: a detached job, from any login host. */
export interface IDetached {
  job_id: number;
  started_on: string;
  state: string;
  node: string;
  end_time: number | null;
  /** The login hosts holding a tunnel to it. */
  attached_on: string[];
}

/** A detached session in one line, as `spunnel-notebook status` says it. */
export function describeDetached(d: IDetached): string {
  const where = d.node ? ` on ${d.node}` : '';
  const tunnels = d.attached_on.length ? d.attached_on.join(', ') : 'none';
  return `Job ${d.job_id} ${d.state}${where} (started on ${d.started_on}; tunnels on: ${tunnels})`;
}

/** What POST spunnel/api/session accepts: field name -> value; empty fields are left out. */
export type StartRequest = Record<string, string | number>;

/** The uiSchema of react-jsonschema-form: per field, `ui:*` keys (`ui:options` for ours). */
export type UiSchema = Record<string, Record<string, unknown>>;

/** The field whose choices are the config's `partitions` (labelled with their limits). */
export const PARTITION_FIELD = 'partition';

/** The data-testid of a field's input: spunnel-mem, spunnel-cpus (cpus_per_task), ... */
export function testId(name: string): string {
  return `spunnel-${name.replace(/_.*/, '')}`;
}

/**
 * The schema and uiSchema the form renders, from the served config: the served properties as they
 * are (the panel has its own heading, so no title), examples as placeholders, partitions labelled
 * with their limits (unavailable ones disabled) and Slurm's default partition preselected when the
 * site sets none.
 */
export function formSchema(config: IConfig): { schema: IFormSchema; uiSchema: UiSchema } {
  const properties: Record<string, IFieldSchema> = {};
  const uiSchema: UiSchema = {};
  for (const [name, served] of Object.entries(config.schema.properties)) {
    // Examples become the placeholder (a <datalist> of them would only get in the way).
    const { examples, ...prop } = served;
    const ui: Record<string, unknown> = { 'ui:options': { testId: testId(name) } };
    if (examples?.length) {
      ui['ui:placeholder'] = `e.g. ${examples.join(', ')}`;
    }
    if (prop.type === 'string' && !prop.enum) {
      // A cleared input stays empty ("not given") instead of snapping back to the default.
      ui['ui:emptyValue'] = '';
    }
    if (name === PARTITION_FIELD && prop.enum) {
      const byName = new Map(config.partitions.map(p => [p.name, p]));
      const label = (n: string) => {
        const p = byName.get(n);
        return p ? partitionLabel(p) : n;
      };
      ui['ui:enumNames'] = prop.enum.map(label);
      const unavailable = prop.enum.filter(n => byName.get(n)?.available === false);
      if (unavailable.length) {
        ui['ui:enumDisabled'] = unavailable;
      }
      // An empty (or unknown) site default means Slurm's default partition.
      if (prop.default === undefined || !prop.enum.includes(String(prop.default))) {
        const slurmDefault = config.partitions.find(p => p.default && prop.enum?.includes(p.name));
        if (slurmDefault) {
          prop.default = slurmDefault.name;
        } else {
          delete prop.default;
        }
      }
    }
    properties[name] = prop;
    uiSchema[name] = ui;
  }
  return { schema: { type: 'object', properties }, uiSchema };
}

/**
 * The POST body from the form's data: the schema's fields only, strings trimmed, empty values left
 * out (the server applies the site defaults), integer fields as numbers (a non-number is sent as
 * typed, for the server to reject with its message).
 */
export function requestBody(schema: IFormSchema, data: Record<string, unknown>): StartRequest {
  const body: StartRequest = {};
  for (const [name, prop] of Object.entries(schema.properties)) {
    const value = data[name];
    if (value === undefined || value === null) {
      continue;
    }
    const text = String(value).trim();
    if (!text) {
      continue;
    }
    if (prop.type === 'integer') {
      const n = typeof value === 'number' ? value : Number(text);
      body[name] = Number.isInteger(n) ? n : text;
    } else {
      body[name] = text;
    }
  }
  return body;
}

/** "interact (default): up to 8:00:00, 8000 MB, 16 CPUs, 1 node". */
export function partitionLabel(p: IPartition): string {
  const limit = p.max_time === null ? 'no time limit' : `up to ${duration(p.max_time)}`;
  const nodes = `${p.nodes} node${p.nodes === 1 ? '' : 's'}`;
  const state = p.available ? '' : ' (unavailable)';
  const name = `${p.name}${p.default ? ' (default)' : ''}${state}`;
  return `${name}: ${limit}, ${p.max_mem_mb} MB, ${p.max_cpus} CPUs, ${nodes}`;
}

/** Seconds as Slurm writes durations: M:SS, H:MM:SS or D-HH:MM:SS. */
export function duration(seconds: number): string {
  const t = Math.max(0, Math.floor(seconds));
  const s = t % 60;
  const m = Math.floor(t / 60) % 60;
  const h = Math.floor(t / 3600) % 24;
  const d = Math.floor(t / 86400);
  const pad = (n: number) => String(n).padStart(2, '0');
  if (d) {
    return `${d}-${pad(h)}:${pad(m)}:${pad(s)}`;
  }
  return h ? `${h}:${pad(m)}:${pad(s)}` : `${m}:${pad(s)}`;
}
