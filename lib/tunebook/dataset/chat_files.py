"""Conversation files as 01's examples: OpenAI messages, ShareGPT and Alpaca rows (data.format).

A row's last assistant turn is its target (the completion and the one gold answer it is scored against); the turns
before it are the prompt, verbatim. The examples have the shape of a question/passages/answers example (id, question,
passages, answers, group) plus `context`, the turns the prompt is made of: `question` is those turns as text (what the
overlap check compares and 05 shows), `passages` is empty (no passage is expected to hold the answer, so nothing is
flagged as a retrieval miss). A row that does not fit stops 01 with one message naming the file, the row and what is
wrong. Leaf-like: it imports only the row helpers.
"""

from __future__ import annotations

import unicodedata

from tunebook.run.rows import DataError, field_value

# What names each format in a first row (`auto`); the configured question and answers fields win over all three.
FORMAT_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output")}
MESSAGE_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def detect_format(row, question_field: str, answers_field: str) -> str:
    """The format a first row is in, from its keys: qa when it holds the configured question and answers fields (so a
    question/passages/answers file reads as it always did), else messages / sharegpt / alpaca by their keys, else qa
    (whose check then names the missing fields)."""
    if not isinstance(row, dict):
        return "qa"
    if field_value(row, question_field) is not None and field_value(row, answers_field) is not None:
        return "qa"
    return next((fmt for fmt, keys in FORMAT_KEYS.items() if all(k in row for k in keys)), "qa")


def conversation_examples(rows: list, fmt: str, source: str, *, id_field: str | None, group_field: str | None, nfkc: bool) -> list[dict]:
    """Validate rows of a conversation format and map them to examples; names the first bad row."""
    norm = (lambda s: unicodedata.normalize("NFKC", s)) if nfkc else (lambda s: s)
    examples, seen = [], set()
    for number, row in enumerate(rows, start=1):
        where = f"{source} row {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object ({_shape(fmt)}), got {type(row).__name__} {row!r:.60}.")
        labelled = _turns(row, fmt, where)  # (where in the row, role, content)
        roles = [role for _, role, _ in labelled]
        last = max((i for i, role in enumerate(roles) if role == "assistant"), default=None)
        if last is None:
            raise DataError(f"{where}: no assistant turn, so nothing to learn (the last assistant turn is the target). Roles here: {roles}.")
        if last != len(roles) - 1:
            raise DataError(
                f"{where}: {labelled[last + 1][0]} ({roles[last + 1]}) comes after the last assistant turn, which is the target: "
                "end the conversation with the assistant's answer (drop the turns after it)."
            )
        if "user" not in roles[:last]:
            raise DataError(f"{where}: no user turn before the last assistant turn: the prompt needs one. Roles here: {roles}.")
        late_system = next((at for i, (at, role, _) in enumerate(labelled) if role == "system" and i > 0), None)
        if late_system:
            raise DataError(
                f"{where}: {late_system} is a system turn after the first turn; a system turn can only come first (many chat templates refuse others)."
            )
        turns = [{"role": role, "content": norm(content)} for _, role, content in labelled]
        group = field_value(row, group_field) if group_field else None
        if group_field and (group is None or (isinstance(group, str) and not group.strip())):
            raise DataError(f"{where}: missing field '{group_field}' (data.group_field). Fields present: {sorted(row)}.")
        raw_id = row.get(id_field) if id_field else None
        row_id = str(raw_id) if raw_id not in (None, "") else str(number)
        if row_id in seen:
            raise DataError(f"{where}: duplicate id '{row_id}' in field '{id_field}'.")
        seen.add(row_id)
        target = turns[last]["content"].strip()  # the end-of-turn token follows it: no space or line break is learnt before it
        examples.append(
            {
                "id": row_id,
                "question": asked(turns[:last]),
                "passages": [],
                "answers": [target],
                "group": str(group) if group_field else row_id,
                "context": turns[:last],
            }
        )
    return examples


def asked(context: list[dict]) -> str:
    """What a conversation asks, as text (the example's question: the eval-overlap check compares it, 05 shows it): a
    single user turn as it is, several turns one a line with their roles; system turns left out (often every row's)."""
    turns = [t for t in context if t["role"] != "system"]
    return turns[0]["content"] if len(turns) == 1 else "\n".join(f"{t['role']}: {t['content']}" for t in turns)


def _shape(fmt: str) -> str:
    return {
        "messages": '{"messages": [{"role": ..., "content": ...}, ...]}',
        "sharegpt": '{"conversations": [{"from": ..., "value": ...}, ...]}',
        "alpaca": '{"instruction": ..., "input": ..., "output": ...}',
    }[fmt]


def _turns(row: dict, fmt: str, where: str) -> list[tuple[str, str, str]]:
    """The row's turns as (where in the row, role, content): system/user/assistant roles, each content non-empty text."""
    if fmt == "alpaca":
        return _alpaca_turns(row, where)
    key, role_key, text_key = ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
    roles = {r: r for r in MESSAGE_ROLES} if fmt == "messages" else SHAREGPT_ROLES
    value = row.get(key)
    if value is None:
        raise DataError(f"{where}: no '{key}' field ({fmt} rows look like {_shape(fmt)}). Fields present: {sorted(row)}.")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a non-empty list of turns, got {type(value).__name__} {value!r:.60}.")
    # LLaMA-Factory's ShareGPT rows keep the system prompt beside the turns.
    turns = _system_field(row, where) if fmt == "sharegpt" else []
    for index, turn in enumerate(value, start=1):
        at = f"{key} turn {index}"
        if not isinstance(turn, dict):
            raise DataError(f"{where}, {at}: expected an object with '{role_key}' and '{text_key}', got {type(turn).__name__} {turn!r:.60}.")
        if role_key not in turn or text_key not in turn:
            raise DataError(f"{where}, {at}: needs '{role_key}' and '{text_key}'; keys here: {sorted(turn)}.")
        role = turn[role_key]
        if role not in roles:
            raise DataError(f"{where}, {at}: unknown role {role!r} in '{role_key}'; {fmt} roles are {', '.join(roles)}.")
        turns.append((at, roles[role], _text(turn[text_key], f"{where}, {at} ({role})", parts=fmt == "messages")))
    return turns


def _alpaca_turns(row: dict, where: str) -> list[tuple[str, str, str]]:
    """system (optional), then instruction + input (a blank line between, when there is an input) as the user turn, then
    output as the assistant turn."""
    missing = [k for k in ("instruction", "output") if row.get(k) is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} (alpaca rows look like {_shape('alpaca')}). Fields present: {sorted(row)}.")
    instruction = _text(row["instruction"], f"{where}, field 'instruction'")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{where}, field 'input': content must be text, got {type(extra).__name__} {extra!r:.60}.")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    output = _text(row["output"], f"{where}, field 'output'")
    return [*_system_field(row, where), ("field 'instruction'", "user", user), ("field 'output'", "assistant", output)]


def _system_field(row: dict, where: str) -> list[tuple[str, str, str]]:
    """A row's own `system` field as a system turn; absent or empty (a CSV's blank cell) = none."""
    value = row.get("system")
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    return [("field 'system'", "system", _text(value, f"{where}, field 'system'"))]


def _text(value, at: str, parts: bool = False) -> str:
    """Non-empty text; with `parts`, OpenAI's list of content parts is joined when every part is text."""
    if parts and isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        kinds = "text (or a list of text parts)" if parts else "text"
        raise DataError(f"{at}: content must be {kinds}, got {type(value).__name__} {value!r:.60}.")
    if not value.strip():
        raise DataError(f"{at}: empty content.")
    return value
