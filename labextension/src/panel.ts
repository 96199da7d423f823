/**
 * The panel: a form to start a session (prefilled with the site defaults), then the session as the
 * server's event stream shows it: queued (job, state, Slurm's reason, elapsed time), ready (node,
 * time left, Open, Stop), ended. Clocks tick here, once a second; the server is only asked again
 * when the user acts.
 */
import { IDisposable } from '@lumino/disposable';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import {
  IConfig,
  IPartition,
  ISnapshot,
  IStartRequest,
  Phase,
  SpunnelAPI,
  SpunnelError
} from './api';

const PHASE_LABELS: Record<Phase, string> = {
  pending: 'Waiting for Slurm to allocate a node',
  starting: 'Starting Jupyter on the node',
  ready: 'Ready',
  ending: 'Stopping',
  ended: 'Ended'
};

/** Form fields: request key, label, input type, placeholder (shown when the site sets no default). */
const FIELDS: [keyof IStartRequest, string, string, string][] = [
  ['mem', 'Memory (MB, or with a unit: 4G)', 'text', "Slurm's default"],
  ['time', 'Time limit', 'text', "the partition's default, e.g. 2:00:00"],
  ['cpus_per_task', 'CPUs', 'number', "Slurm's default"],
  ['gpus', 'GPUs (optional)', 'text', 'e.g. 1 or a100:1'],
  ['account', 'Account (optional)', 'text', 'your default account'],
  ['tunnels', 'Extra tunnels (optional)', 'text', 'login:node ports, e.g. 8001:8000']
];

export class SpunnelPanel extends Widget {
  constructor(private readonly api: SpunnelAPI) {
    super();
    this.id = 'spunnel-panel';
    this.title.label = 'Compute node';
    this.title.caption = 'Jupyter on a compute node';
    this.title.closable = true;
    this.addClass('jp-SpunnelPanel');
    this.node.dataset.testid = 'spunnel-panel';
    this.node.append(
      el('h2', {}, 'Jupyter on a compute node'),
      this.errorBox,
      this.notice,
      this.form,
      this.status
    );
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.stream?.dispose();
    window.clearInterval(this.ticker);
    super.dispose();
  }

  protected onAfterAttach(msg: Message): void {
    super.onAfterAttach(msg);
    this.ticker = window.setInterval(() => this.tick(), 1000);
    if (this.isVisible) {
      this.connect();
    }
  }

  /** A tab in Notebook 7's file browser page is attached hidden: connect when first shown. */
  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this.connect();
  }

  protected onBeforeDetach(msg: Message): void {
    window.clearInterval(this.ticker);
    super.onBeforeDetach(msg);
  }

  /** Follow the session on the event stream, and load the form (once). */
  private connect(): void {
    if (this.stream) {
      return;
    }
    this.stream = this.api.watch(
      snapshot => this.display(snapshot),
      () =>
        this.fail(
          new SpunnelError(
            'the server refused the session event stream',
            'reload the page; check that the spunnel_jupyter server extension is enabled'
          )
        )
    );
    void this.load();
  }

  /** Fetch the site defaults and partitions (for the form) and the session, if any. */
  private async load(): Promise<void> {
    try {
      const [config, session] = await Promise.all([this.api.config(), this.api.session()]);
      this.buildForm(config);
      this.fail(null);
      // The stream may already have said more recent things than this answer.
      if (this.snapshot === undefined) {
        this.display(session);
      }
    } catch (e) {
      this.form.replaceChildren();
      this.fail(e, () => void this.load());
    }
  }

  private buildForm(config: IConfig): void {
    const { defaults, partitions } = config;
    const select = el('select', { name: 'partition', 'data-testid': 'spunnel-partition' });
    // An empty site default means Slurm's default partition.
    const preferred = defaults.partition || partitions.find(p => p.default)?.name;
    for (const p of partitions) {
      const option = el('option', { value: p.name }, partitionLabel(p));
      option.disabled = !p.available;
      option.selected = p.name === preferred;
      select.append(option);
    }
    const values: Record<string, string> = {
      mem: defaults.mem,
      time: defaults.time,
      cpus_per_task: defaults.cpus_per_task ? String(defaults.cpus_per_task) : '',
      gpus: defaults.gpus
    };
    this.form.replaceChildren(
      field('Partition', select),
      ...FIELDS.map(([name, label, type, placeholder]) => {
        const input = el('input', {
          name,
          type,
          placeholder,
          'data-testid': `spunnel-${name.replace(/_.*/, '')}`
        });
        input.value = values[name] ?? '';
        if (type === 'number') {
          input.min = '1';
        }
        return field(label, input);
      }),
      el(
        'button',
        { type: 'submit', class: 'jp-mod-styled jp-mod-accept', 'data-testid': 'spunnel-start' },
        'Start'
      )
    );
    this.form.onsubmit = event => {
      event.preventDefault();
      void this.start();
    };
    this.render();
  }

  private async start(): Promise<void> {
    const req: Record<string, string | number> = {};
    for (const [name, value] of new FormData(this.form)) {
      const text = String(value).trim();
      if (text) {
        req[name] = name === 'cpus_per_task' ? Number(text) : text;
      }
    }
    this.busy = true;
    this.render();
    try {
      const snapshot = await this.api.start(req as IStartRequest);
      this.fail(null);
      this.display(snapshot);
    } catch (e) {
      this.fail(e);
    } finally {
      this.busy = false;
      this.render();
    }
  }

  private async stop(): Promise<void> {
    this.busy = true;
    this.render();
    try {
      await this.api.stop();
      this.fail(null);
      this.display(await this.api.session());
    } catch (e) {
      this.fail(e);
    } finally {
      this.busy = false;
      this.render();
    }
  }

  private display(snapshot: ISnapshot | null): void {
    this.snapshot = snapshot;
    this.render();
  }

  /** Show an error (message and remedy; with a Retry button when `retry` is given), or clear it. */
  private fail(error: unknown, retry?: () => void): void {
    if (error === null) {
      this.errorBox.hidden = true;
      return;
    }
    const { message, remedy } =
      error instanceof SpunnelError ? error : { message: String(error), remedy: '' };
    this.errorBox.replaceChildren(
      el('div', { class: 'jp-SpunnelPanel-errorMessage' }, message),
      el('div', { class: 'jp-SpunnelPanel-remedy' }, remedy)
    );
    if (retry) {
      const button = el(
        'button',
        { class: 'jp-mod-styled', 'data-testid': 'spunnel-retry' },
        'Retry'
      );
      button.onclick = retry;
      this.errorBox.append(button);
    }
    this.errorBox.hidden = false;
  }

  /** Lay the panel out for the current snapshot: the form, or the session's state. */
  private render(): void {
    const s = this.snapshot ?? null;
    const live = s !== null && s.phase !== 'ended';
    this.form.hidden = live;
    this.status.hidden = !live;
    const start = this.form.querySelector('button');
    if (start) {
      start.disabled = this.busy;
      start.textContent = this.busy ? 'Submitting…' : 'Start';
    }
    this.notice.hidden = !(s?.phase === 'ended');
    this.notice.textContent =
      s?.phase === 'ended' ? `The last session ended: ${s.ended_reason || 'no reason given'}.` : '';
    if (!live) {
      return;
    }
    const rows: [string, string, string][] = [
      ['Job', 'job-id', String(s.job_id ?? '–')],
      ['Job state', 'job-state', s.job_state || '–']
    ];
    if (s.phase === 'pending' || (s.phase === 'starting' && s.reason)) {
      rows.push(['Reason', 'reason', s.reason || '–']);
    }
    if (s.phase === 'pending' || s.phase === 'starting') {
      rows.push(['Elapsed', 'elapsed', '']);
    }
    if (s.node) {
      rows.push(['Node', 'node', s.node]);
    }
    if (s.phase === 'ready') {
      rows.push(['Time left', 'remaining', ''], ['Port on the login host', 'port', String(s.port)]);
    }
    if (s.tunnels.length) {
      rows.push(['Extra tunnels', 'tunnels', s.tunnels.join(', ')]);
    }
    if (s.owner === 'cli') {
      rows.push(['Started by', 'owner', 'spunnel-notebook, in a terminal']);
    }
    const buttons = el('div', { class: 'jp-SpunnelPanel-buttons' });
    if (s.phase === 'ready') {
      const open = el(
        'button',
        { class: 'jp-mod-styled jp-mod-accept', 'data-testid': 'spunnel-open' },
        'Open'
      );
      open.onclick = () => window.open(s.url, '_blank', 'noopener');
      buttons.append(open);
    }
    if (s.phase !== 'ending') {
      const stop = el(
        'button',
        { class: 'jp-mod-styled jp-mod-warn', 'data-testid': 'spunnel-stop' },
        s.phase === 'ready' ? 'Stop' : 'Cancel'
      );
      stop.disabled = this.busy;
      stop.onclick = () => void this.stop();
      buttons.append(stop);
    }
    this.status.replaceChildren(
      el(
        'div',
        { class: 'jp-SpunnelPanel-phase', 'data-testid': 'spunnel-phase', 'data-phase': s.phase },
        PHASE_LABELS[s.phase]
      ),
      el(
        'dl',
        {},
        ...rows.flatMap(([label, key, value]) => [
          el('dt', {}, label),
          el('dd', { 'data-testid': `spunnel-${key}` }, value)
        ])
      ),
      buttons
    );
    this.tick();
  }

  /** Update the clocks: time since submission while waiting, time left while ready. */
  private tick(): void {
    const s = this.snapshot;
    if (!s) {
      return;
    }
    const now = this.api.serverNow();
    const elapsed = this.status.querySelector('[data-testid="spunnel-elapsed"]');
    if (elapsed) {
      elapsed.textContent = duration(now - s.times.submitted);
    }
    const remaining = this.status.querySelector('[data-testid="spunnel-remaining"]');
    if (remaining) {
      remaining.textContent = s.end_time === null ? 'no limit' : duration(s.end_time - now);
    }
  }

  private readonly errorBox = el('div', {
    class: 'jp-SpunnelPanel-error',
    role: 'alert',
    'data-testid': 'spunnel-error',
    hidden: ''
  });
  private readonly notice = el('div', {
    class: 'jp-SpunnelPanel-notice',
    'data-testid': 'spunnel-notice',
    hidden: ''
  });
  private readonly form = el(
    'form',
    { class: 'jp-SpunnelPanel-form', 'data-testid': 'spunnel-form' },
    'Loading…'
  );
  private readonly status = el('section', { class: 'jp-SpunnelPanel-status', hidden: '' });
  /** undefined until the server said anything; null: no session. */
  private snapshot: ISnapshot | null | undefined = undefined;
  private busy = false;
  private ticker = 0;
  private stream: IDisposable | null = null;
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string>,
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function field(label: string, input: HTMLElement): HTMLLabelElement {
  return el('label', { class: 'jp-SpunnelPanel-field' }, el('span', {}, label), input);
}

/** "interact (default): up to 8:00:00, 8000 MB, 16 CPUs, 1 node". */
function partitionLabel(p: IPartition): string {
  const limit = p.max_time === null ? 'no time limit' : `up to ${duration(p.max_time)}`;
  const nodes = `${p.nodes} node${p.nodes === 1 ? '' : 's'}`;
  const state = p.available ? '' : ' (unavailable)';
  return `${p.name}${p.default ? ' (default)' : ''}${state}: ${limit}, ${p.max_mem_mb} MB, ${p.max_cpus} CPUs, ${nodes}`;
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
