/**
 * Unit tests of src/notice.ts (the node plugin's logic), run by Node's own test runner on the
 * compiled output (npm test).
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  clockOffset,
  INotice,
  parseNotice,
  saveAsked,
  savedAnswer,
  secondsLeft,
  timeLeftText,
  warningsToShow
} from '../src/notice';

/** What spunnel_jupyter/node_extension.py serves. */
function served(over: Partial<INotice> = {}): INotice {
  return {
    end_time: 1_000_600,
    warnings: [
      { id: '4242-1000600-600', text: 'stops in 10 min', at: 1_000_000 },
      { id: '4242-1000600-60', text: 'stops in 1 min', at: 1_000_540 }
    ],
    save_seq: 0,
    now: 1_000_000,
    ...over
  };
}

describe('parseNotice', () => {
  it('takes what the server extension serves', () => {
    assert.deepEqual(parseNotice(served()), served());
    assert.deepEqual(parseNotice({ ...served(), end_time: null }), served({ end_time: null }));
  });

  it('refuses what is not a notice', () => {
    for (const body of [
      null,
      'x',
      {},
      { ...served(), save_seq: '1' },
      { ...served(), now: null }
    ]) {
      assert.equal(parseNotice(body), null);
    }
    assert.equal(parseNotice({ ...served(), warnings: {} }), null);
  });

  it('drops malformed warnings, keeps the rest', () => {
    const body = { ...served(), warnings: [{ id: 1, text: 'x', at: 0 }, served().warnings[0]] };
    assert.deepEqual(parseNotice(body)?.warnings, [served().warnings[0]]);
  });
});

describe('time left', () => {
  it("counts on the node's clock, whatever the browser's says", () => {
    // The browser's clock is 100 s behind the node's.
    const offset = clockOffset(served(), (1_000_000 - 100) * 1000);
    assert.equal(offset, 100);
    assert.equal(secondsLeft(1_000_600, offset, (1_000_000 - 100 + 30) * 1000), 570);
  });

  it('is never negative, and absent without an end', () => {
    assert.equal(secondsLeft(1_000_600, 0, 2_000_000 * 1000), 0);
    assert.equal(secondsLeft(null, 0, 0), null);
  });

  it('reads as Slurm writes durations', () => {
    assert.equal(timeLeftText(3723), 'Time left 1:02:03');
    assert.equal(timeLeftText(59.9), 'Time left 0:59');
    assert.equal(timeLeftText(null), '');
  });
});

describe('warningsToShow', () => {
  it('shows each warning once', () => {
    const seen = new Set<string>();
    const first = served({ warnings: served().warnings.slice(0, 1) });
    assert.deepEqual(warningsToShow(first, seen), first.warnings);
    assert.deepEqual(warningsToShow(first, seen), []);
    assert.deepEqual(warningsToShow(served(), seen), [served().warnings[1]]);
    assert.deepEqual(warningsToShow(served(), seen), []);
  });

  it('shows only the newest of several a late page never saw', () => {
    const seen = new Set<string>();
    assert.deepEqual(warningsToShow(served(), seen), [served().warnings[1]]);
    assert.deepEqual(
      [...seen].sort(),
      served()
        .warnings.map(w => w.id)
        .sort()
    );
  });
});

describe('saves', () => {
  it('are asked for when save_seq goes up, not by the first notice a page gets', () => {
    assert.equal(saveAsked(null, served({ save_seq: 3 })), false);
    assert.equal(saveAsked(3, served({ save_seq: 3 })), false);
    assert.equal(saveAsked(3, served({ save_seq: 4 })), true);
    assert.equal(saveAsked(3, served({ save_seq: 1 })), false); // an older answer, out of order
  });

  it('are answered with what was dirty and is clean now', () => {
    assert.deepEqual(savedAnswer(2, ['a.ipynb', 'b.py'], ['b.py'], false), {
      seq: 2,
      saved: ['a.ipynb'],
      failed: ['b.py']
    });
    assert.deepEqual(savedAnswer(2, [], [], false), { seq: 2, saved: [], failed: [] });
  });

  it('count everything as failed when Save All threw', () => {
    assert.deepEqual(savedAnswer(5, ['a.ipynb'], [], true), {
      seq: 5,
      saved: [],
      failed: ['a.ipynb']
    });
  });
});
