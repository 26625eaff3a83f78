"""docs/errors.md names a test for every bad input; each named test must exist."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
# `test_x.py::test_name[param]`, `::test_name` (same file as the one before), `test_x.py` alone
REFERENCE = re.compile(r"`(?:tests/)?(test_\w+\.py)?(?:::(\w+)(?:\[[^\]`]*\])?)?`")


def defined_functions(path):
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def references(table_text):
    """(line number, file, test name or None) for each test named in the table's last column."""
    found = []
    for number, line in enumerate(table_text.splitlines(), 1):
        if not line.startswith("| ") or line.startswith("| ---") or line.startswith("| input"):
            continue
        last_cell = line.rstrip().rstrip("|").rsplit("|", 1)[-1]
        current = None
        for match in REFERENCE.finditer(last_cell):
            file, name = match.groups()
            if file is None and name is None:
                continue
            current = file or current
            found.append((number, current, name))
    return found


def test_every_test_named_in_the_bad_input_table_exists():
    text = (REPO / "docs" / "errors.md").read_text()
    refs = references(text)
    assert len(refs) > 90, "the table's test column was not parsed"
    missing = []
    for number, file, name in refs:
        path = TESTS / file if file else None
        if path is None or not path.exists():
            missing.append(f"line {number}: {file} (no such test file)")
        elif name and name not in defined_functions(path):
            missing.append(f"line {number}: {file}::{name}")
    assert not missing, "docs/errors.md names tests that do not exist:\n" + "\n".join(missing)


def test_every_row_names_a_test():
    text = (REPO / "docs" / "errors.md").read_text()
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith(("| ---", "| input"))
    ]
    without = [row[:80] for row in rows if not REFERENCE.search(row.rsplit("|", 2)[-2])]
    assert not without, "rows without a test:\n" + "\n".join(without)


def test_the_checker_finds_a_missing_test(tmp_path):
    table = (
        "| input | what you get | test |\n| --- | --- | --- |\n"
        "| x | y | `test_errors_doc.py::defined_functions`, `::no_such_test` |\n"
    )
    refs = references(table)
    assert refs == [
        (3, "test_errors_doc.py", "defined_functions"),
        (3, "test_errors_doc.py", "no_such_test"),
    ]
    assert "no_such_test" not in defined_functions(TESTS / "test_errors_doc.py")
