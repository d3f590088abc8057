"""Judge reply parsing: every accepted shape, and a clear error for everything else."""

import pytest

from dar.eval.replies import ReplyParseError, parse_checkpoints, parse_score, parse_score_pair, parse_yes_no

NESTED = '{"checkpoint_results": {"A_check_1": {"pass": 1, "hard_id": "H1"}, "B_check_2": {"pass": 0}}, "rationale_short": "x"}'


@pytest.mark.parametrize(
    "reply",
    [
        NESTED,
        "```json\n" + NESTED + "\n```",
        "```\n" + NESTED + "\n```",
        "Sure! Here is the evaluation.\n" + NESTED + "\nLet me know if you need more.",
        '{"checkpoint_results": {"A_check_1": 1, "B_check_2": 0}}',
        '{"checkpoints": {"A_check_1": true, "B_check_2": false}}',
        '{"A_check_1": "pass", "B_check_2": "fail", "rationale_short": "top level"}',
        'Reasoning with {braces} first. {"checkpoint_results": {"A_check_1": {"pass": "1"}, "B_check_2": {"pass": "0"}}}',
    ],
)
def test_checkpoint_shapes(reply):
    assert parse_checkpoints(reply) == {"A_check_1": 1, "B_check_2": 0}


def test_checkpoint_json_with_braces_inside_strings():
    reply = 'Note: {"rationale_short": "looks like {this}", "checkpoint_results": {"G_check_3": 1}}'
    assert parse_checkpoints(reply) == {"G_check_3": 1}


@pytest.mark.parametrize(
    "reply, message",
    [
        ("The image looks great, all checks pass.", "no JSON object"),
        # truncated: only the innermost {"pass": 1} is complete, and it names no checkpoint
        ('{"checkpoint_results": {"A_check_1": {"pass": 1}', "no checkpoint verdicts"),
        ('{"score": 7}', "no checkpoint verdicts"),
        ('{"checkpoint_results": {"A_check_1": 2}}', "0 or 1"),
        ('{"checkpoint_results": {"A_check_1": {"verdict": 1}}}', "no 'pass' field"),
        ('{"checkpoint_results": {"A_check_1": "maybe"}}', "0 or 1"),
        ("", "no JSON object"),
    ],
)
def test_checkpoint_failures_raise(reply, message):
    with pytest.raises(ReplyParseError, match=message) as info:
        parse_checkpoints(reply)
    assert info.value.reply == reply


def test_non_string_reply_is_a_type_error():
    for parser in (parse_checkpoints, parse_score_pair, parse_yes_no, parse_score):
        with pytest.raises(TypeError, match="reply"):
            parser(None)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('{"score": [8, 7], "reasoning": "fine"}', (8.0, 7.0)),
        ('```json\n{"scores": [9.5, 0]}\n```', (9.5, 0.0)),
        ("output score = [6, 4.5]", (6.0, 4.5)),
        ("I would say [ 10 , 3 ] overall.", (10.0, 3.0)),
    ],
)
def test_score_pair_shapes(reply, expected):
    assert parse_score_pair(reply) == expected


@pytest.mark.parametrize(
    "reply, message",
    [
        ("Naturalness is high and artifacts are few.", "no \\[score1, score2\\]"),
        ('{"score": [8, 11]}', "within \\[0, 10\\]"),
        ('{"score": [8, 7, 6]}', "exactly two"),
        ('{"score": ["a", 7]}', "number"),
        ("score = [-1, 5]", "within"),
    ],
)
def test_score_pair_failures(reply, message):
    with pytest.raises(ReplyParseError, match=message):
        parse_score_pair(reply)


def test_single_score():
    assert parse_score('{"score": 7.5, "reasoning": "ok"}') == 7.5
    assert parse_score('Result:\n```json\n{"reasoning": "x", "score": 0}\n```') == 0.0
    with pytest.raises(ReplyParseError, match="within"):
        parse_score('{"score": 12}')
    with pytest.raises(ReplyParseError, match="'score' field"):
        parse_score('{"rating": 5}')
    with pytest.raises(ReplyParseError, match="number"):
        parse_score('{"score": true}')


@pytest.mark.parametrize("reply, expected", [("Yes", True), ("yes.", True), ("No", False), (" no\n", False),
                                             ('{"answer": "yes"}', True), ('{"answer": false}', False),
                                             ("Answer: NO", False)])
def test_yes_no(reply, expected):
    assert parse_yes_no(reply) is expected


@pytest.mark.parametrize("reply", ["", "yes and no", "Maybe", "I cannot tell."])
def test_yes_no_ambiguous_raises(reply):
    with pytest.raises(ReplyParseError, match="yes or no"):
        parse_yes_no(reply)
