"""Fitting a prompt to a token budget: the largest amount of filler whose prompt still fits."""


def largest_fitting(count_at, target: int, cap: int | None = None) -> int:
    """
    Largest `n` (at most `cap`) with `count_at(n) <= target`, assuming `count_at(0)` fits and `count_at` grows with
    `n`. Token counts grow about linearly with the filler, so each probe aims where the line through `(0, count_at(0))`
    and the last probe crosses `target`; a probe that lands outside the bracket falls back to doubling or bisection.
    """
    base = count_at(0)
    lo, hi = 0, (cap + 1 if cap is not None else None)  # lo fits; hi (when known) does not
    n, aimed = 64, 0
    while hi is None or hi - lo > 1:
        n = max(n, lo + 1) if hi is None else min(max(n, lo + 1), hi - 1)
        count = count_at(n)
        if count <= target:
            lo = n
        else:
            hi = n
        estimate = int((target - base) * n / (count - base)) if count > base else None
        aimed += 1
        if estimate is not None and aimed <= 6:
            # Just above the estimate after a fit, on it after an overshoot: the bracket closes in a probe or two.
            n = estimate + 1 if count <= target else estimate
        else:
            n = 2 * n if hi is None else (lo + hi) // 2
        if n <= lo or (hi is not None and n >= hi):
            n = 2 * max(lo, 1) if hi is None else (lo + hi) // 2
    return lo
