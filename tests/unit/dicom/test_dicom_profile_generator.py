"""The Table E.1-1 module is generated, reproducibly, from the licensed source data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from phivault.dicom.deid import Action, DeidOptions, profile_attribute, resolve_action
from phivault.dicom.profile_table import ATTRIBUTES

ROOT = Path(__file__).resolve().parents[3]


def test_generator_in_check_mode_reproduces_the_committed_module_byte_for_byte() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_deid_profile.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generator_check_fails_when_the_module_differs(tmp_path: Path) -> None:
    stale = tmp_path / "profile_table.py"
    stale.write_text("# edited by hand\n", encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "generate_deid_profile.py"),
            "--check",
            "--target",
            str(stale),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1


def test_source_data_ships_with_its_mit_licence() -> None:
    data = ROOT / "src" / "phivault" / "dicom" / "data"
    assert "Innolitics" in (data / "LICENSE.txt").read_text(encoding="utf-8")
    assert (data / "confidentiality_profile_attributes.json").is_file()


def test_table_holds_every_row_of_the_source_with_known_action_codes() -> None:
    assert len(ATTRIBUTES) == 621
    assert {a.basic for a in ATTRIBUTES} <= {
        "D",
        "Z",
        "X",
        "K",
        "C",
        "U",
        "Z/D",
        "X/Z",
        "X/D",
        "X/Z/D",
        "X/Z/U*",
    }


def test_repeating_curve_and_overlay_groups_are_matched() -> None:
    curve = profile_attribute(0x50020010)
    overlay_data = profile_attribute(0x60023000)
    assert curve is not None
    assert curve.name == "Curve Data"
    assert overlay_data is not None
    assert overlay_data.name == "Overlay Data"
    assert profile_attribute(0x60020010) is None  # Overlay Rows: not in the table, kept
    assert resolve_action(overlay_data, DeidOptions()) is Action.REMOVE
