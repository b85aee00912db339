"""The annotation tables in the workspace: rounds, the tasks pushed per round, and pulled annotations."""

from __future__ import annotations

from fvqa.store import Workspace

DDL = """
CREATE TABLE IF NOT EXISTS annotation_rounds (
    round VARCHAR PRIMARY KEY, kind VARCHAR, project_id BIGINT, server_url VARCHAR, split VARCHAR,
    annotators INTEGER, parent_round VARCHAR, created_at TIMESTAMP, pulled_at TIMESTAMP, prefill BOOLEAN);
CREATE TABLE IF NOT EXISTS annotation_tasks (
    round VARCHAR, item_id VARCHAR, task_id BIGINT, project_id BIGINT, pushed_at TIMESTAMP,
    PRIMARY KEY (round, item_id));
CREATE TABLE IF NOT EXISTS annotations (
    round VARCHAR, annotation_id BIGINT, task_id BIGINT, project_id BIGINT, item_id VARCHAR,
    annotator VARCHAR, annotator_id BIGINT, verdict VARCHAR, answer VARCHAR, proposed_answer VARCHAR,
    knowledge_type VARCHAR, search_label VARCHAR, comment VARCHAR, question VARCHAR, aliases VARCHAR[],
    image_sha256 VARCHAR, lead_time DOUBLE, created_at VARCHAR, updated_at VARCHAR, pulled_at TIMESTAMP,
    proposed_question VARCHAR, proposed_aliases VARCHAR[], PRIMARY KEY (round, annotation_id));
"""


# columns added after the first release, for workspaces made before them. `prefill` says whether
# a round's tasks came pre-filled with pipeline values (read its agreement with that in mind; NULL:
# pushed before the switch existed, when they always were). `gold.question` holds a reviewed
# question edit (the dataset view reads it once `fvqa.store` COALESCEs it like the answer).
MIGRATIONS = """
ALTER TABLE annotation_rounds ADD COLUMN IF NOT EXISTS prefill BOOLEAN;
ALTER TABLE annotations ADD COLUMN IF NOT EXISTS proposed_question VARCHAR;
ALTER TABLE annotations ADD COLUMN IF NOT EXISTS proposed_aliases VARCHAR[];
ALTER TABLE gold ADD COLUMN IF NOT EXISTS question VARCHAR;
"""


def ensure(ws: Workspace) -> None:
    """Create the annotation tables if missing, and add columns newer than the workspace."""
    ws.ensure_table(DDL)
    for stmt in filter(None, (s.strip() for s in MIGRATIONS.split(";"))):
        ws.execute(stmt)


def round_row(ws: Workspace, name: str) -> dict | None:
    """One `annotation_rounds` row as a dict, or None."""
    cur = ws.con.execute("SELECT * FROM annotation_rounds WHERE round = ?", [name])
    cols = [d[0] for d in cur.description]
    rows = cur.fetchall()
    return dict(zip(cols, rows[0], strict=True)) if rows else None
