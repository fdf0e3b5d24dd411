"""gross.report: mean ± std over runs, searched − uniform against its spread (2 standard errors)."""
import math

import pytest

from gross import report


def _row(method, accs):
    results = [{"test_acc": a, "exported": f"exported/{method}.pt"} for a in accs]
    return report.row("4", method, {"conv2": 4}, 1000, 0.5, results)


def test_rows_hold_mean_and_sample_std():
    r = _row("uniform", [0.90, 0.92, 0.94])
    assert r["test_acc_mean"] == pytest.approx(0.92) and r["test_acc_std"] == pytest.approx(0.02)
    assert r["test_accs"] == [0.90, 0.92, 0.94] and r["exported"] == "exported/uniform.pt"


def test_difference_is_judged_against_twice_its_standard_error():
    uniform = _row("uniform", [0.90, 0.92, 0.94])      # std 0.02
    close = _row("searched", [0.91, 0.93, 0.95])        # +0.01, std 0.02
    far = _row("searched", [0.95, 0.96, 0.97])          # +0.04, std 0.01
    spread = 2 * math.sqrt(0.02 ** 2 / 3 + 0.02 ** 2 / 3)  # 0.0327
    c = report.compare(uniform, close)
    assert c["difference"] == pytest.approx(0.01) and c["spread"] == pytest.approx(spread) and c["exceeds"] is False
    c = report.compare(uniform, far)
    assert c["difference"] == pytest.approx(0.04) and c["exceeds"] is True
    assert report.compare(far, uniform)["difference"] == pytest.approx(-0.04)
    # 96.11 ± 0.19 against 95.67 ± 0.33 (n = 3, 300 test images): −0.44 is exactly its spread, not beyond it
    tie = report.compare(_row("uniform", [288 / 300, 288 / 300, 289 / 300]),
                         _row("searched", [286 / 300, 287 / 300, 288 / 300]))
    assert tie["difference"] == pytest.approx(-tie["spread"]) and tie["exceeds"] is False
    single = report.compare(_row("uniform", [0.9]), _row("searched", [0.95]))
    assert single["spread"] is None and single["exceeds"] is None


def test_table_says_what_it_shows():
    rows = [_row("uniform", [0.90, 0.92, 0.94]), _row("searched", [0.95, 0.96, 0.97]),
            _row("uniform", [0.90]), _row("searched", [0.91])]
    comparisons = [report.compare(rows[0], rows[1]), report.compare(rows[2], rows[3])]
    table = report.markdown_table(rows, comparisons, ["conv2"], 5)
    assert "| 4 | uniform | 4 | 0.001 M | 50.00 % | 92.00 ± 2.00 % (n=3) |" in table
    assert "| 4 | +4.00 % | 2.58 % | yes: searched better |" in table
    assert "| 4 | +1.00 % | – | cannot tell: one run per configuration has no spread |" in table
    assert "never the report split" in table and "twice the standard error" in table
