"""Pure tests of the trusted-parent judging rules (no sandbox needed)."""

from __future__ import annotations

import pytest
from posttrain.sandboxes.judge import normalize_output, prepare_tests
from posttrain.sandboxes.runner import encode_value, strict_eq


def test_literal_asserts_become_value_tests_with_expected_kept_in_parent() -> None:
    specs = prepare_tests(["assert f(1) == [1, 2]", "assert 3 == g(x)", "assert f(1)", "assert f(a) == g(b)"])
    assert [s.kind for s in specs] == ["value", "value", "stmt", "stmt"]
    assert specs[0].payload == "f(1)" and specs[0].expected == ["list", [["int", "1"], ["int", "2"]]]
    assert specs[1].payload == "g(x)" and specs[1].expected == ["int", "3"]
    assert "__pt_strict_eq__(f(a), g(b))" in specs[3].payload


def test_equalities_inside_test_functions_are_rewritten_strict() -> None:
    src = "def check(c):\n    assert c(1) == 2\n    assert c(2) != 3, 'msg'\n    x = c(1) == 2\ncheck(f)"
    (spec,) = prepare_tests([src])
    assert spec.kind == "stmt"
    assert "assert __pt_strict_eq__(c(1), 2)" in spec.payload
    assert "assert not __pt_strict_eq__(c(2), 3)" in spec.payload
    assert "x = c(1) == 2" in spec.payload  # only asserts are rewritten


def test_bad_test_string_names_the_test() -> None:
    with pytest.raises(ValueError, match=r"tests\[1\] is not valid Python"):
        prepare_tests(["assert True", "assert ("])


def test_type_strict_encoding_rejects_forged_eq_and_cross_type() -> None:
    class AlwaysEqual:
        def __eq__(self, other: object) -> bool:
            return True

    class FakeInt(int):
        pass

    with pytest.raises(TypeError):
        encode_value(AlwaysEqual())
    with pytest.raises(TypeError):
        encode_value(FakeInt(3))
    assert not strict_eq(AlwaysEqual(), 3)
    assert not strict_eq(1, 1.0) and not strict_eq(1, True) and not strict_eq((1,), [1])
    assert strict_eq({"a": [1, (2, 3)]}, {"a": [1, (2, 3)]}) and strict_eq({1, 2}, {2, 1})


def test_io_normalization_only_strips_trailing_whitespace() -> None:
    assert normalize_output("1 2  \n3\n\n") == normalize_output("1 2\n3")
    assert normalize_output(" 1") != normalize_output("1")
    assert normalize_output("1\n2") != normalize_output("12")
