// Deadlines, written once: a piece of work raced against a timer that is always cleared,
// and optionally against an AbortSignal. Every deadline of the service goes through here
// (each step of reaching the broker, the drain's waits), so none can leak a timer or
// settle twice.

export interface DeadlineOptions {
  /** What the deadline's rejection is; called once, when the time is up. */
  late: () => Error;
  /** Gives up at once when aborted, with this signal's reason. */
  signal?: AbortSignal;
  /** Runs when the deadline or the signal wins (to destroy what is still on its way). */
  onGiveUp?: () => void;
}

/** `work`, unless `ms` pass (or the signal aborts) first. */
export async function withDeadline<T>(work: Promise<T>, ms: number, opts: DeadlineOptions): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  let onAbort = () => {};
  const { signal } = opts;
  const giveUp = new Promise<never>((_, reject) => {
    const stop = (err: Error) => {
      opts.onGiveUp?.();
      reject(err);
    };
    timer = setTimeout(() => stop(opts.late()), Math.max(0, ms));
    onAbort = () => stop(signal?.reason instanceof Error ? signal.reason : new Error(String(signal?.reason)));
    if (signal?.aborted) onAbort();
    else signal?.addEventListener('abort', onAbort, { once: true });
  });
  try {
    return await Promise.race([work, giveUp]);
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener('abort', onAbort);
  }
}

/** Whether `promise` settles (either way) within `ms`. */
export async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  const late = new Error('late');
  return withDeadline(
    promise.then(
      () => true,
      () => true,
    ),
    ms,
    { late: () => late },
  ).catch((err) => {
    if (err === late) return false;
    throw err;
  });
}
