import pytest

from reweighting.qprobe.rewards import exact_match, extract_number, numeric_match


def test_exact_match_ignores_case_and_whitespace():
    assert exact_match("  Paris\n", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 12.", 12.0),
        ("7 plus 5 equals twelve", 12.0),
        ("six times seven is forty-two", 42.0),
        ("It is 1,234 in all", 1234.0),
        ("-3 degrees", -3.0),
        ("about 2.5 litres", 2.5),
        ("no number here", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numeric_match():
    assert numeric_match("3 + 4 = 7", 7) == 1.0
    assert numeric_match("3 + 4 = 8", "7") == 0.0
    assert numeric_match("7, since 3 + 4", 7, which="first") == 1.0
    assert numeric_match("nothing", 7) == 0.0
    with pytest.raises(ValueError, match="which"):
        numeric_match("7", 7, which="middle")
