"""Correct programs score 1 and wrong ones 0, judged as the tests would judge them in one process:
answers of the standard library's containers and numbers, deep and large answers, prompts that do
not compile alone, MBPP-shaped problems, and programs that use processes, threads, the user database
and name resolution."""

import pytest

from reweighting.qprobe.sandbox import (
    SandboxLimits,
    TestedProgram,
    code_reward,
    humaneval_program,
    isolation_available,
    mbpp_program,
    prelude_of,
    run_program,
    run_programs,
)

needs_sandbox = pytest.mark.skipif(not isolation_available()[0], reason=isolation_available()[1])
LIMITS = SandboxLimits(wall_seconds=20.0, cpu_seconds=5, memory_bytes=1 << 30, max_processes=64)

OD = "from collections import OrderedDict\n"
# name -> (program defining f, body of check(c), whether it must pass). Each "right" answer passes in
# one process with these tests; each "wrong" one fails there too.
FAITHFUL = {
    "OrderedDict in order": (OD + "def f():\n    return OrderedDict([('b', 1), ('a', 2)])",
                             OD + "    assert c() == OrderedDict([('b', 1), ('a', 2)])", True),
    "OrderedDict out of order": (OD + "def f():\n    return OrderedDict([('a', 2), ('b', 1)])",
                                 OD + "    assert c() == OrderedDict([('b', 1), ('a', 2)])", False),
    "defaultdict keeps its default": ("from collections import defaultdict\ndef f():\n    d = defaultdict(list)\n"
                                      "    d['k'].append(1)\n    return d",
                                      "d = c()\n    assert d['missing'] == [] and d == {'k': [1], 'missing': []}",
                                      True),
    "defaultdict of a lambda still compares": ("from collections import defaultdict\ndef f():\n"
                                               "    return defaultdict(lambda: 0, a=1)",
                                               "assert c() == {'a': 1}", True),
    "Counter": ("from collections import Counter\ndef f():\n    return Counter('abca')",
                "r = c()\n    assert r == {'a': 2, 'b': 1, 'c': 1} and r['z'] == 0 and r.most_common(1) == [('a', 2)]",
                True),
    "deque with maxlen": ("from collections import deque\ndef f():\n    return deque([1, 2, 3], maxlen=3)",
                          "from collections import deque\n    r = c()\n"
                          "    assert r == deque([1, 2, 3]) and r.maxlen == 3",
                          True),
    "deque is not a list": ("from collections import deque\ndef f():\n    return deque([1, 2])",
                            "assert c() != [1, 2]", True),
    "dict_keys compares as a set": ("def f():\n    return {'a': 1, 'b': 2}.keys()", "assert c() == {'b', 'a'}", True),
    "dict_values": ("def f():\n    return {'a': 1}.values()", "assert list(c()) == [1]", True),
    "dict_items": ("def f():\n    return {'a': 1}.items()", "assert c() == {('a', 1)}", True),
    "bytearray": ("def f():\n    return bytearray(b'ab')", "r = c()\n    assert r == b'ab' and type(r) is bytearray",
                  True),
    "Fraction is exact": ("from fractions import Fraction\ndef f():\n    return Fraction(1, 3)",
                          "from fractions import Fraction\n"
                          "    assert c() == Fraction(1, 3) and c() != 0.3333333333333333",
                          True),
    "Decimal is exact": ("from decimal import Decimal\ndef f():\n    return Decimal('0.1') + Decimal('0.2')",
                         "from decimal import Decimal\n    assert c() == Decimal('0.3')", True),
    "complex": ("def f():\n    return complex(1, -2)", "assert c() == 1 - 2j", True),
    "range": ("def f():\n    return range(0, 10, 3)", "assert c() == range(0, 10, 3) and list(c()) == [0, 3, 6, 9]",
              True),
    "nested 900 deep": ("def f():\n    x = []\n    for _ in range(900):\n        x = [x]\n    return x",
                        "x = []\n    for _ in range(900):\n        x = [x]\n    assert c() == x", True),
    "an OrderedDict argument": ("def f(d):\n    return list(d)", "from collections import OrderedDict\n"
                                "    assert c(OrderedDict([('z', 1), ('a', 2)])) == ['z', 'a']", True),
}


@needs_sandbox
def test_answers_are_compared_as_the_tests_compare_them():
    programs = [TestedProgram(source + "\n", f"def check(c):\n    {test}\n", "f")
                for source, test, _ in FAITHFUL.values()]
    results = run_programs(programs, LIMITS, workers=4)
    got = {name: r.status for name, r in zip(FAITHFUL, results)}
    assert got == {name: "passed" if ok else "failed" for name, (_, _, ok) in FAITHFUL.items()}, results


@needs_sandbox
def test_a_large_answer_passes_and_a_refused_type_is_named():
    big = TestedProgram("def f():\n    return 'x' * (40 << 20)\n",
                        "def check(c):\n    assert c() == 'x' * (40 << 20)\n", "f")
    assert run_program(big, LIMITS).status == "passed"
    refused = run_program(TestedProgram("def f():\n    return f\n", "def check(c):\n    assert c()\n", "f"), LIMITS)
    assert refused.status == "failed" and "function cannot be passed" in refused.detail, refused
    nest = "def f():\n    x = []\n    for _ in range(1200):\n        x = [x]\n    return x\n"
    too_deep = run_program(TestedProgram(nest, "def check(c):\n    c()\n", "f"), LIMITS)
    assert too_deep.status == "failed" and "nested more than 1000 deep" in too_deep.detail, too_deep


def test_prelude_of_prompts_that_do_not_compile_alone():
    assert prelude_of("import math\ndef add(a, b):\n", "add") == "import math\n"
    assert prelude_of("def helper():\n    return 1\n\ndef add(a, b):\n    # add them\n", "add") == \
        "def helper():\n    return 1\n\n"
    whole = 'def add(a, b):\n    """Add."""\n'
    assert prelude_of(whole, "add") == whole
    assert prelude_of("from os import path\n@decorator\ndef add(a, b):\n", "add") == "from os import path\n"
    assert prelude_of("def add(a, b:\n", "add") == ""


@needs_sandbox
def test_prompts_that_do_not_compile_alone_score():
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    cases = [("def add(a, b):\n", "    return a + b\n", 1.0), ("def add(a, b):\n", "    return a - b\n", 0.0),
             ("import math\n\ndef add(a, b):\n    # add a and b\n", "    return math.fsum([a, b])\n", 1.0),
             ("def add(a, b):\n    # add a and b\n", "    return a * b\n", 0.0)]
    programs = [humaneval_program({"prompt": p, "test": test, "entry_point": "add"}, c) for p, c, _ in cases]
    assert code_reward(programs, LIMITS) == [want for _, _, want in cases]


# MBPP-shaped problems (the benchmark's own fields), with a right and a wrong program each.
MBPP = [
    ({"text": "Write a function to find the shared elements from the given two lists.",
      "test_list": ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
                    "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == set((3, 4))"],
      "test_setup_code": ""},
     "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
     "def similar_elements(a, b):\n    return tuple(set(a) | set(b))\n"),
    ({"text": "Write a python function to identify non-prime numbers.",
      "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                    "assert is_not_prime(35) == True"], "test_setup_code": ""},
     "import math\ndef is_not_prime(n):\n    return any(n % i == 0 for i in range(2, int(math.sqrt(n)) + 1))\n",
     "def is_not_prime(n):\n    return n % 2 == 0\n"),
    ({"text": "Write a function to find the largest integers from a given list using heap queue.",
      "test_list": ["assert heap_queue_largest([25, 35, 22, 85, 14, 65, 75, 22, 58], 3) == [85, 75, 65]"],
      "test_setup_code": "import heapq as hq"},
     "import heapq as hq\ndef heap_queue_largest(nums, n):\n    return hq.nlargest(n, nums)\n",
     "def heap_queue_largest(nums, n):\n    return sorted(nums)[:n]\n"),
    ({"text": "Write a function to compute the area of a circle.",
      "test_list": ["assert math.isclose(circle_area(2), 12.566370614359172)"], "test_setup_code": "import math"},
     "import math\ndef circle_area(r):\n    return math.pi * r * r\n",
     "def circle_area(r):\n    return 3.14 * r * r\n"),
]


@needs_sandbox
def test_mbpp_shaped_problems_score():
    programs = [mbpp_program(problem, code) for problem, right, wrong in MBPP for code in (right, wrong)]
    assert code_reward(programs, LIMITS) == [1.0, 0.0] * len(MBPP)


def test_mbpp_program_names_the_function_under_test_and_checks_its_input():
    program = mbpp_program(MBPP[3][0], MBPP[3][1])
    assert program.entry_point == "circle_area" and program.test.startswith("import math\n")
    with pytest.raises(ValueError, match="test_list"):
        mbpp_program({"test_list": []}, "")
    with pytest.raises(ValueError, match=r"test_list'\]\[0\] calls no function"):
        mbpp_program({"test_list": ["assert len([1]) == 1"]}, "")
    with pytest.raises(ValueError, match="not valid Python"):
        mbpp_program({"test_list": ["assert f(1 =="]}, "")
    with pytest.raises(TypeError, match="completion"):
        mbpp_program(MBPP[0][0], None)


RUNTIME = {
    "multiprocessing.Pool": "import multiprocessing\ndef sq(x):\n    return x * x\ndef f(n):\n"
                            "    with multiprocessing.Pool(2) as pool:\n        return sum(pool.map(sq, range(n)))\n",
    "ThreadPoolExecutor(20)": "from concurrent.futures import ThreadPoolExecutor\ndef f(n):\n"
                              "    with ThreadPoolExecutor(20) as pool:\n"
                              "        return sum(pool.map(lambda x: x * x, range(n)))\n",
    "getpass.getuser": "import getpass\ndef f(n):\n    assert getpass.getuser() == 'sandbox'\n"
                       "    return sum(x * x for x in range(n))\n",
    "resolve localhost": "import socket\ndef f(n):\n    socket.getaddrinfo('localhost', 80)\n"
                         "    assert socket.gethostbyname('localhost') == '127.0.0.1'\n"
                         "    return sum(x * x for x in range(n))\n",
}


@needs_sandbox
def test_programs_using_processes_threads_users_and_localhost_score_one():
    test = "def check(c):\n    assert c(10) == 285\n"
    results = run_programs([TestedProgram(source, test, "f") for source in RUNTIME.values()], LIMITS, workers=2)
    assert {name: r.status for name, r in zip(RUNTIME, results)} == {name: "passed" for name in RUNTIME}, results


@needs_sandbox
def test_tests_that_use_more_than_cpu_seconds_are_named_so():
    slow = TestedProgram("def f():\n    return 1\n",
                         "import time\ndef check(c):\n    end = time.process_time() + 2.5\n"
                         "    while time.process_time() < end:\n        pass\n    assert c() == 1\n", "f")
    result = run_program(slow, SandboxLimits(wall_seconds=10.0, cpu_seconds=1))
    assert result.status == "cpu_limit" and "the tests' process" in result.detail, result
