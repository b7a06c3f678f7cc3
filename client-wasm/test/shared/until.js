/** Resolves once `cond()` holds, polling; rejects after `ms` (a failed test must not leave
 * a poll loop that keeps the process alive). */
export function until(cond, ms = 60_000) {
  const deadline = Date.now() + ms;
  return new Promise((resolve, reject) => {
    const check = () => {
      if (cond()) resolve();
      else if (Date.now() > deadline) reject(new Error(`condition not met within ${ms} ms: ${cond}`));
      else setTimeout(check, 5);
    };
    check();
  });
}
