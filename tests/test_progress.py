"""Progress bars: each modality's bar stops its clock when the modality finishes and, at the end,
shows the modality's own training time, not the whole run's."""

import io
import re

from sdml_ext.engine.progress import EpochBars
from sdml_ext.engine.records import EpochStats


class Terminal(io.StringIO):
    def isatty(self) -> bool:  # tqdm draws only on a terminal
        return True


def stats(name, epoch):
    return EpochStats(name, epoch, 1.0, 0.5, 0.5, 1.0, 0.5, 0.25, True)


def final_times(text: str, names) -> dict:
    """The elapsed time each bar shows in its last drawing."""
    drawings = re.split(r"[\r\n]|\x1b\[[0-9]*[AB]", text)
    times = {}
    for line in drawings:
        for name in names:
            found = re.match(rf"{name}\s*: .*\| 2/2 \[(\d\d:\d\d)", line.strip())
            if found:
                times[name] = found.group(1)
    return times


def test_each_bar_ends_with_its_modalitys_own_time(monkeypatch):
    clock = [1000.0]
    import tqdm.std

    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])  # what each bar reads its clock from
    term = Terminal()
    bars = EpochBars(["aa", "b"], 2, file=term)
    for name, epoch, at in [("aa", 1, 1001), ("aa", 2, 1003), ("b", 1, 1010), ("b", 2, 1020)]:
        clock[0] = at
        bars(stats(name, epoch))
    clock[0] = 1100  # the run ends long after both modalities
    assert final_times(term.getvalue(), ["aa", "b"]) == {"aa": "00:03", "b": "00:20"}  # clocks stopped
    bars.close({"aa": 2.0, "b": None})  # aa's own training time is known; b's is not (shared moments)
    assert final_times(term.getvalue(), ["aa", "b"]) == {"aa": "00:02", "b": "00:20"}
    assert "01:40" not in term.getvalue()  # the run's 100 s are nowhere
