"""Running a test's body in a thread of its own, so that a hang fails the test instead of the run."""

import threading


def within(body, seconds: float, timed_out: str):
    """``body()``'s result (or the error it raised) from a daemon thread given ``seconds``;
    ``timed_out`` if it had not returned by then."""
    box = [timed_out]

    def run():
        try:
            box[0] = body()
        except Exception as e:  # noqa: BLE001 - the error is what the test looks at
            box[0] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return box[0]
