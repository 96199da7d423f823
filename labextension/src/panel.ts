/**
 * The panel: a form to start a session (prefilled with the site defaults), then the session as the
 * server's event stream shows it: queued (job, state, Slurm's reason, elapsed time), ready (node,
 * time left, Open, Stop), ended. Clocks tick here, once a second; the server is only asked again
 * when the user acts.
 */
import { IDisposable } from '@lumino/disposable';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';
import { createElement } from 'react';
import { createRoot } from 'react-dom/client';

import { ISnapshot, Phase, SpunnelAPI, SpunnelError } from './api';
import { StartForm } from './form';
import { Notification as LabNotification } from '@jupyterlab/apputils';

import {
  describeDetached,
  dueWarnings,
  duration,
  IConfig,
  IDetached,
  StartRequest,
  timeLimitWarning
} from './logic';

/** Seconds in the queue after which the start is worth a notification. */
const STARTED_AFTER = 10;

const PHASE_LABELS: Record<Phase, string> = {
  pending: 'Waiting for Slurm to allocate a node',
  starting: 'Starting Jupyter on the node',
  ready: 'Ready',
  ending: 'Stopping',
  ended: 'Ended'
};

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
      this.detachedBox,
      this.form,
      this.status
    );
    this.renderForm();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.stream?.dispose();
    window.clearInterval(this.ticker);
    this.formRoot.unmount();
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
      this.config = config;
      await this.loadDetached();
      this.fail(null);
      this.render();
      // The stream may already have said more recent things than this answer.
      if (this.snapshot === undefined) {
        this.display(session);
      }
    } catch (e) {
      this.config = null;
      this.render();
      this.fail(e, () => void this.load());
    }
  }

  /** The user's detached sessions (shown with Attach while this host has none); [] if unknown. */
  private async loadDetached(): Promise<void> {
    try {
      this.detachedList = await this.api.detached();
    } catch {
      this.detachedList = [];
    }
    this.render();
  }

  /** The job started after waiting: a browser notification (the user may be in another tab). */
  private tellStarted(s: ISnapshot): void {
    const waited = (s.times.running ?? this.api.serverNow()) - s.times.submitted;
    if (waited > STARTED_AFTER && 'Notification' in window) {
      if (Notification.permission === 'granted') {
        new Notification('Jupyter on a compute node', {
          body: `Job ${s.job_id} started on ${s.node} after ${duration(waited)} in the queue`
        });
      }
    }
  }

  private async start(req: StartRequest, attach?: number): Promise<void> {
    if ('Notification' in window && Notification.permission === 'default') {
      void Notification.requestPermission(); // asked once, on first use: told when a job starts
    }
    this.busy = true;
    this.render();
    try {
      const snapshot =
        attach === undefined ? await this.api.start(req) : await this.api.attach(attach);
      this.fail(null);
      this.display(snapshot);
    } catch (e) {
      this.fail(e);
    } finally {
      this.busy = false;
      this.render();
    }
  }

  private async stop(detach = false): Promise<void> {
    this.busy = true;
    this.render();
    try {
      await this.api.stop(detach);
      this.fail(null);
      this.display(await this.api.session());
      await this.loadDetached();
    } catch (e) {
      this.fail(e);
    } finally {
      this.busy = false;
      this.render();
    }
  }

  private display(snapshot: ISnapshot | null): void {
    const ended = this.snapshot?.phase !== 'ended' && snapshot?.phase === 'ended';
    if (this.snapshot?.phase === 'pending' && snapshot && snapshot.phase !== 'pending') {
      this.startToTell = true; // a job that waited started: told once its node is known too
    }
    if (this.startToTell && (snapshot?.node || !snapshot || snapshot.phase === 'ended')) {
      this.startToTell = false;
      if (snapshot?.node) {
        this.tellStarted(snapshot);
      }
    }
    if (snapshot && snapshot.job_id !== this.snapshot?.job_id) {
      this.warned.clear(); // another session: its own warnings
      this.warning = '';
    }
    for (const text of snapshot?.warnings ?? []) {
      if (!this.warnedNode.has(text)) {
        this.warnedNode.add(text);
        this.warn(text);
      }
    }
    this.snapshot = snapshot;
    this.render();
    if (ended) {
      void this.loadDetached(); // a session that ended here may have been a tunnel to one
    }
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
    this.renderForm();
    this.notice.textContent =
      s?.phase === 'ended'
        ? `The last session ended: ${s.ended_reason || 'no reason given'}.`
        : live
          ? this.warning
          : '';
    this.notice.hidden = !this.notice.textContent;
    this.renderDetached(live);
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
    if (s.phase === 'pending' && s.expected_start) {
      const at = new Date(s.expected_start * 1000);
      rows.push(['Expected start', 'expected-start', at.toLocaleTimeString()]);
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
    if (s.kind === 'detached') {
      rows.push(['Kind', 'kind', 'detached: runs on without its terminal']);
    } else if (s.kind === 'attached') {
      rows.push(['Kind', 'kind', 'attached: a tunnel here to a detached session']);
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
    if (s.phase !== 'ending' && s.kind === 'attached' && s.owner === 'jupyterlab') {
      const detach = el(
        'button',
        { class: 'jp-mod-styled', 'data-testid': 'spunnel-detach' },
        'Detach'
      );
      detach.disabled = this.busy;
      detach.onclick = () => void this.stop(true);
      buttons.append(detach);
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

  /** The detached sessions, each with Attach, while this host has no live session. */
  private renderDetached(live: boolean): void {
    const list = live ? [] : this.detachedList;
    this.detachedBox.hidden = list.length === 0;
    this.detachedBox.replaceChildren(
      el('h3', {}, 'Detached sessions'),
      ...list.map(d => {
        const attach = el(
          'button',
          { class: 'jp-mod-styled jp-mod-accept', 'data-testid': `spunnel-attach-${d.job_id}` },
          'Attach'
        );
        attach.disabled = this.busy;
        attach.onclick = () => void this.start({}, d.job_id);
        return el('div', { class: 'jp-SpunnelPanel-detached' }, describeDetached(d), attach);
      })
    );
  }

  /** The form, once the config is loaded (rendered from its schema); "Loading…" until then. */
  private renderForm(): void {
    const config = this.config;
    if (config === undefined) {
      this.formRoot.render('Loading…');
    } else if (config === null) {
      this.formRoot.render(null);
    } else {
      this.formRoot.render(
        createElement(StartForm, {
          config,
          busy: this.busy,
          onStart: req => void this.start(req)
        })
      );
    }
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
    if (s.phase === 'ready' && s.end_time !== null && this.config) {
      const left = s.end_time - now;
      const due = dueWarnings(this.config.warn_before ?? [], this.warned, left);
      if (due.length) {
        due.forEach(minutes => this.warned.add(minutes));
        this.warn(timeLimitWarning(s.job_id, left));
      }
    }
  }

  /** A warning: a notification that stays until closed, and the panel's notice line. */
  private warn(text: string): void {
    LabNotification.warning(text, { autoClose: false });
    this.warning = text;
    this.render();
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
  private readonly detachedBox = el('section', {
    class: 'jp-SpunnelPanel-detachedList',
    'data-testid': 'spunnel-detached',
    hidden: ''
  });
  private detachedList: IDetached[] = [];
  private readonly form = el('div', {
    class: 'jp-SpunnelPanel-form',
    'data-testid': 'spunnel-form'
  });
  private readonly formRoot = createRoot(this.form);
  /** undefined until loaded; null: loading failed. */
  private config: IConfig | null | undefined = undefined;
  private readonly status = el('section', { class: 'jp-SpunnelPanel-status', hidden: '' });
  /** undefined until the server said anything; null: no session. */
  private snapshot: ISnapshot | null | undefined = undefined;
  private busy = false;
  /** The time-limit warnings already given (minutes before the end). */
  private warned = new Set<number>();
  /** A job that waited has started, and the browser's notification is still to come. */
  private startToTell = false;
  /** The last warning, shown in the panel until the session ends. */
  private warning = '';
  /** The node's warnings already shown (each text once). */
  private warnedNode = new Set<string>();
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
