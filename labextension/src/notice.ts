/**
 * The node plugin's own logic, apart from the DOM and JupyterLab (unit tested in
 * test/notice.test.ts): what a notice from the launcher asks of this page (warnings not shown yet,
 * a save), and the time left on the node's clock.
 *
 * The notice is GET spunnel-node/api/notice of the node's own server extension
 * (spunnel_jupyter/node_extension.py), which serves what the launcher writes.
 */
import { duration } from './logic';

export interface IWarning {
  /** Unique per job, end time and threshold: a warning is shown once. */
  id: string;
  text: string;
  /** When the launcher gave it (epoch seconds, the node's clock). */
  at: number;
}

/** GET spunnel-node/api/notice. */
export interface INotice {
  /** The job's end (epoch seconds, the node's clock); null when unknown or unlimited. */
  end_time: number | null;
  warnings: IWarning[];
  /** Raised by the launcher to ask for a save of every open document. */
  save_seq: number;
  /** The node's clock when it answered (epoch seconds). */
  now: number;
}

/** POST spunnel-node/api/saved. */
export interface ISavedAnswer {
  seq: number;
  saved: string[];
  failed: string[];
}

/** A notice as served, or null if the body is not one (an older or foreign server). */
export function parseNotice(body: unknown): INotice | null {
  if (typeof body !== 'object' || body === null) {
    return null;
  }
  const b = body as Record<string, unknown>;
  const end = b.end_time;
  if (
    !(end === null || typeof end === 'number') ||
    typeof b.save_seq !== 'number' ||
    typeof b.now !== 'number' ||
    !Array.isArray(b.warnings)
  ) {
    return null;
  }
  const warnings = b.warnings.filter(
    (w): w is IWarning =>
      typeof w === 'object' &&
      w !== null &&
      typeof w.id === 'string' &&
      typeof w.text === 'string' &&
      typeof w.at === 'number'
  );
  return { end_time: end, warnings, save_seq: b.save_seq, now: b.now };
}

/** How far the node's clock is ahead of this browser's (seconds), from a fresh answer. */
export function clockOffset(notice: INotice, browserNowMs: number): number {
  return notice.now - browserNowMs / 1000;
}

/** Seconds left until the end, on the node's clock; null when there is no end. */
export function secondsLeft(
  endTime: number | null,
  offset: number,
  browserNowMs: number
): number | null {
  return endTime === null ? null : Math.max(0, endTime - (browserNowMs / 1000 + offset));
}

/** The status bar's text: "Time left 1:02:03", or '' when there is no end. */
export function timeLeftText(left: number | null): string {
  return left === null ? '' : `Time left ${duration(left)}`;
}

/**
 * The warnings to show now, each id once (`seen` is updated): of several not seen yet (a page
 * opened late) only the newest, whose time left is the nearest to the truth.
 */
export function warningsToShow(notice: INotice, seen: Set<string>): IWarning[] {
  const fresh = notice.warnings.filter(w => !seen.has(w.id));
  fresh.forEach(w => seen.add(w.id));
  const newest = fresh.reduce<IWarning | null>(
    (a, w) => (a === null || w.at >= a.at ? w : a),
    null
  );
  return newest ? [newest] : [];
}

/**
 * Whether a notice asks this page to save: its save_seq went up since the last one seen. The
 * first notice a page gets only sets the baseline (a page just opened has no unsaved edits).
 */
export function saveAsked(lastSeq: number | null, notice: INotice): boolean {
  return lastSeq !== null && notice.save_seq > lastSeq;
}

/** The answer to save request `seq`: which of the documents dirty before are clean now. */
export function savedAnswer(
  seq: number,
  dirtyBefore: string[],
  dirtyAfter: string[],
  error: boolean
): ISavedAnswer {
  const still = new Set(dirtyAfter);
  const failed = error ? dirtyBefore : dirtyBefore.filter(p => still.has(p));
  return { seq, saved: dirtyBefore.filter(p => !failed.includes(p)), failed };
}
