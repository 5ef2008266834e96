

@pytest.mark.slow
def test_docs_table_is_current():
    from pathlib import Path

    from transformers_table import END, START, table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "transformers.md").read_text()
    stored = doc.split(START)[1].split(END)[0].strip()
    assert stored == table(list(FAMILIES)), \
        "docs/transformers.md's table is out of date: run python tests/transformers_table.py --write docs/transformers.md"
