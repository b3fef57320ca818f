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
        ("between 10-20 apples", 20.0),
        ("pages 3-5, then 10", 10.0),
        ("1,2,3", 3.0),
        ("1,23", 23.0),
        ("1,2345", 2345.0),
        ("10,000,000 in all", 1e7),
        ("12,345.5", 12345.5),
        ("1.5e3", 1500.0),
        ("2.5E-2", 0.025),
        ("2eggs", 2.0),
        ("x = -5", -5.0),
        ("(-5)", -5.0),
        ("x-1", 1.0),
        ("5 - 3", 3.0),
        ("\u22127 below", -7.0),
        ("The answer is 7.", 7.0),
        ("1/2", 2.0),
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


@pytest.mark.parametrize("text, first", [("10-20", 10.0), ("1,2,3", 1.0), ("-4 or 5", -4.0), ("1.5e3 then 2", 1500.0)])
def test_extract_first_number(text, first):
    assert extract_number(text, "first") == first


def test_extract_number_rejects_non_text():
    with pytest.raises(TypeError, match="text must be a string"):
        extract_number(12)
