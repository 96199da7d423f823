/**
 * Client of the spunnel-jupyter server extension's REST API ({base_url}spunnel/api/...).
 *
 * Requests go through ServerConnection.makeRequest, which adds the token and the XSRF header; the
 * event stream uses the browser's EventSource (same origin: the login cookie authenticates it, and
 * the page's token, when it has one, is appended as jupyter-server-proxy does).
 */
import { PageConfig, URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IDisposable } from '@lumino/disposable';

import { IConfig, IDetached, StartRequest } from './logic';

export type Phase = 'pending' | 'starting' | 'ready' | 'ending' | 'ended';

/** The session as the server shows it; times are epoch seconds on the server's clock. */
export interface ISnapshot {
  phase: Phase;
  job_id: number | null;
  job_state: string;
  reason: string;
  node: string;
  end_time: number | null;
  /** The node's own warnings (an idle release ahead), oldest first. */
  warnings?: string[];
  /** While pending: when Slurm expects to start the job, if it knows. */
  expected_start?: number | null;
  url: string;
  times: { submitted: number; running?: number; ready?: number };
  ended_reason?: string;
  owner: 'cli' | 'jupyterlab';
  /** foreground; detached (its job outlives the terminal); attached (a tunnel to one). */
  kind?: 'foreground' | 'detached' | 'attached';
  tunnels: string[];
  port: number;
}

/** An error answer of the API: the server's message and what to do about it. */
export class SpunnelError extends Error {
  constructor(
    message: string,
    readonly remedy: string = '',
    readonly status: number = 0
  ) {
    super(message);
  }
}

export class SpunnelAPI {
  constructor(readonly settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {}

  /**
   * Server clock minus browser clock, in ms, from the last response's Date header (1 s
   * resolution): elapsed and remaining times are computed against the server's timestamps.
   */
  clockOffset = 0;

  /** The server's current time in epoch seconds. */
  serverNow(): number {
    return (Date.now() + this.clockOffset) / 1000;
  }

  async config(): Promise<IConfig> {
    return (await this.request('config')) as IConfig;
  }

  /** The current session, or null when there is none. */
  async session(): Promise<ISnapshot | null> {
    try {
      return (await this.request('session')) as ISnapshot;
    } catch (e) {
      if (e instanceof SpunnelError && e.status === 404) {
        return null;
      }
      throw e;
    }
  }

  async start(req: StartRequest): Promise<ISnapshot> {
    return (await this.request('session', {
      method: 'POST',
      body: JSON.stringify(req)
    })) as ISnapshot;
  }

  /** The user's detached sessions (from any login host) other than this host's own. */
  async detached(): Promise<IDetached[]> {
    return ((await this.request('detached')) as { sessions: IDetached[] }).sessions;
  }

  /** A tunnel on this host to detached session `job` (its URL then opens from here). */
  async attach(job: number): Promise<ISnapshot> {
    return (await this.request('session', {
      method: 'POST',
      body: JSON.stringify({ attach: job })
    })) as ISnapshot;
  }

  /**
   * Stop the session; resolves once it is torn down (a session already gone is no error).
   * `detach`: close only this server's tunnel to a detached session; its job runs on.
   */
  async stop(detach = false): Promise<void> {
    try {
      await this.request(detach ? 'session?detach=1' : 'session', { method: 'DELETE' });
    } catch (e) {
      if (!(e instanceof SpunnelError && e.status === 404)) {
        throw e;
      }
    }
  }

  /**
   * Call `onChange` with every snapshot the server pushes (null: no session), starting with the
   * current one. EventSource reconnects by itself after a dropped connection (and is sent the
   * current snapshot again); `onRefused` is called when it gives up, i.e. the server answered with
   * an error. Dispose to close the stream.
   */
  watch(onChange: (snapshot: ISnapshot | null) => void, onRefused: () => void): IDisposable {
    let url = URLExt.join(this.settings.baseUrl, 'spunnel/api/session/events');
    const token = PageConfig.getToken();
    if (token) {
      url += '?token=' + encodeURIComponent(token);
    }
    const source = new EventSource(url);
    source.onmessage = (event: MessageEvent<string>) => {
      onChange(JSON.parse(event.data) as ISnapshot | null);
    };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        onRefused();
      }
    };
    return {
      get isDisposed() {
        return source.readyState === EventSource.CLOSED;
      },
      dispose: () => source.close()
    };
  }

  private async request(path: string, init: RequestInit = {}): Promise<unknown> {
    const url = URLExt.join(this.settings.baseUrl, 'spunnel/api', path);
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(url, init, this.settings);
    } catch (e) {
      throw new SpunnelError(
        `the Jupyter server did not answer (${String(e)})`,
        'check that the Jupyter server is still running'
      );
    }
    const date = Date.parse(response.headers.get('Date') ?? '');
    if (!isNaN(date)) {
      // The header is truncated to the second: its middle is the best guess.
      this.clockOffset = date + 500 - Date.now();
    }
    const text = await response.text();
    let data: unknown = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      // not JSON (a proxy's error page, say): reported below with the status
    }
    if (!response.ok) {
      const error = (data ?? {}) as { message?: string; remedy?: string };
      throw new SpunnelError(
        error.message ?? `${response.status} ${response.statusText}`,
        error.remedy ?? '',
        response.status
      );
    }
    return data;
  }
}
