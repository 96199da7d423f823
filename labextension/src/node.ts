/**
 * The node plugin: runs only in the Jupyter a session runs on its compute node (the launcher's
 * page config sets `spunnelNode`). It shows the time left in the status bar, each warning the
 * launcher gives before the time limit as a JupyterLab notification (once), and when the
 * launcher asks for a save (before a stop, a scancel, the time limit) it saves every open
 * document and tells the launcher which were saved.
 *
 * It asks the node's server extension for the notice every few seconds, and at once when the
 * extension says on Jupyter's event bus that the notice changed, so that a save is done within
 * the launcher's grace (2 s by default), even in a background tab.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Notification } from '@jupyterlab/apputils';
import { PageConfig, URLExt } from '@jupyterlab/coreutils';
import { IDocumentManager } from '@jupyterlab/docmanager';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

import {
  clockOffset,
  INotice,
  parseNotice,
  saveAsked,
  savedAnswer,
  secondsLeft,
  timeLeftText,
  warningsToShow
} from './notice';

/** The page config option the launcher sets in the node's Jupyter only. */
const FLAG = 'spunnelNode';
/** node_extension.py's EVENT_SCHEMA: the notice changed. */
const EVENT_SCHEMA = 'https://spunnel-jupyter.invalid/events/node-notice';
const POLL_MS = 5000;
/** Below this many seconds left, the status bar item is shown as a warning. */
const LOW_SECONDS = 600;
const SEEN_KEY = 'spunnel-jupyter:seen-warnings';

export const nodePlugin: JupyterFrontEndPlugin<void> = {
  id: 'spunnel-jupyter:node',
  description:
    'In the Jupyter of a compute-node session: the time left, warnings before the time limit, ' +
    'and every open document saved before the session ends.',
  autoStart: true,
  optional: [IStatusBar, IDocumentManager],
  activate: (
    app: JupyterFrontEnd,
    statusBar: IStatusBar | null,
    docManager: IDocumentManager | null
  ) => {
    if (PageConfig.getOption(FLAG) !== 'true') {
      return;
    }
    const watcher = new NoticeWatcher(app, docManager);
    statusBar?.registerStatusItem('spunnel-jupyter:time-left', {
      item: watcher.status,
      align: 'left',
      rank: 100,
      isActive: () => watcher.hasEnd
    });
    watcher.start();
  }
};

class NoticeWatcher {
  constructor(
    private readonly app: JupyterFrontEnd,
    private readonly docManager: IDocumentManager | null
  ) {
    this.status.addClass('jp-SpunnelNode-timeLeft');
    this.status.node.dataset.testid = 'spunnel-time-left';
    this.status.node.title = "Time left before the job's time limit ends this Jupyter";
  }

  readonly status = new Widget();

  get hasEnd(): boolean {
    return this.notice?.end_time !== null && this.notice?.end_time !== undefined;
  }

  start(): void {
    this.app.serviceManager.events.stream.connect((_, event) => {
      if (event.schema_id === EVENT_SCHEMA) {
        void this.refresh();
      }
    });
    window.setInterval(() => this.tick(), 1000);
    void this.refresh();
  }

  /** Fetch the notice now (once at a time; a call meanwhile fetches again after) and act on it. */
  private async refresh(): Promise<void> {
    if (this.fetching) {
      this.again = true;
      return;
    }
    this.fetching = true;
    window.clearTimeout(this.timer);
    try {
      do {
        this.again = false;
        const notice = await this.fetchNotice();
        if (notice) {
          this.handle(notice);
        }
      } while (this.again);
    } finally {
      this.fetching = false;
      this.timer = window.setTimeout(() => void this.refresh(), POLL_MS);
    }
  }

  private async fetchNotice(): Promise<INotice | null> {
    try {
      const response = await ServerConnection.makeRequest(this.url('notice'), {}, this.settings);
      return response.ok ? parseNotice(await response.json()) : null;
    } catch {
      return null; // the server is going away, or the network is: the next poll tries again
    }
  }

  private handle(notice: INotice): void {
    this.offset = clockOffset(notice, Date.now());
    const ask = saveAsked(this.lastSeq, notice);
    this.lastSeq = notice.save_seq;
    this.notice = notice;
    const seen = loadSeen();
    for (const w of warningsToShow(notice, seen)) {
      Notification.warning(w.text, { autoClose: false });
    }
    saveSeen(seen);
    this.tick();
    if (ask) {
      this.saving = this.saving.then(() => this.save(notice.save_seq));
    }
  }

  /** Save every open document (what File > Save All does), and say which were saved. */
  private async save(seq: number): Promise<void> {
    const before = this.dirtyPaths();
    let error = false;
    try {
      await this.app.commands.execute('docmanager:save-all');
    } catch (e) {
      console.warn('spunnel-jupyter: saving before the end failed', e);
      error = true;
    }
    const answer = savedAnswer(seq, before, this.dirtyPaths(), error);
    try {
      const init = { method: 'POST', body: JSON.stringify(answer) };
      await ServerConnection.makeRequest(this.url('saved'), init, this.settings);
    } catch {
      // the server is already gone: nothing to tell
    }
  }

  /** The paths of the open documents with unsaved changes. */
  private dirtyPaths(): string[] {
    const paths = new Set<string>();
    if (this.docManager) {
      for (const widget of this.app.shell.widgets('main')) {
        const context = this.docManager.contextForWidget(widget);
        if (context?.model.dirty) {
          paths.add(context.path);
        }
      }
    }
    return [...paths];
  }

  private tick(): void {
    const left = secondsLeft(this.notice?.end_time ?? null, this.offset, Date.now());
    this.status.node.textContent = timeLeftText(left);
    this.status.toggleClass('jp-mod-warn', left !== null && left <= LOW_SECONDS);
  }

  private url(name: string): string {
    return URLExt.join(this.settings.baseUrl, 'spunnel-node', 'api', name);
  }

  private readonly settings = ServerConnection.makeSettings();
  private notice: INotice | null = null;
  private offset = 0;
  private lastSeq: number | null = null;
  private saving: Promise<void> = Promise.resolve();
  private fetching = false;
  private again = false;
  private timer = 0;
}

/** The warnings already shown in this tab (a reload included): each is shown once per tab. */
function loadSeen(): Set<string> {
  try {
    return new Set(JSON.parse(window.sessionStorage.getItem(SEEN_KEY) ?? '[]') as string[]);
  } catch {
    return new Set();
  }
}

function saveSeen(seen: Set<string>): void {
  try {
    window.sessionStorage.setItem(SEEN_KEY, JSON.stringify([...seen].slice(-50)));
  } catch {
    // storage refused: a warning may show again after a reload
  }
}
