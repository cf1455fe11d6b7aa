"""gateway/norid.py: organisation numbers and national identity numbers (mod-11)."""

import datetime as dt

import pytest

from gateway import norid


def _weighted(digits: str, weights: tuple[int, ...]) -> int:
    return sum(int(d) * w for d, w in zip(digits, weights))


@pytest.mark.parametrize("org", ["991825827", "958935420", "974760673", "123456785"])
def test_valid_org_numbers(org):
    assert norid.is_org_number(org)
    assert norid.generate_org_number(org[:8]) == org


@pytest.mark.parametrize(
    "org",
    [
        "991825828",  # wrong check digit
        "99182582",  # too short
        "9918258270",  # too long
        "99182582a",
        "٩٩١٨٢٥٨٢٧",  # Arabic-Indic digits: isdigit() but not ASCII
        " 991825827",
        "",
        None,
        991825827,
    ],
)
def test_invalid_org_numbers(org):
    assert not norid.is_org_number(org)


def test_org_prefix_without_valid_check_digit():
    # Remainder 1 would need check digit 10: no valid number has these first eight digits.
    prefixes = [f"{n:08d}" for n in range(10000000, 10000200)]
    none_valid = [p for p in prefixes if norid.generate_org_number(p) is None]
    assert none_valid, "some prefixes must have no valid check digit"
    for p in none_valid:
        assert not any(norid.is_org_number(p + str(d)) for d in range(10))


def test_shape_only_accepts_any_nine_digits():
    assert norid.is_org_number_shape("991825828")
    assert not norid.is_org_number_shape("99182582")


@pytest.mark.parametrize(
    "dnumber,synthetic,kind", [(False, False, "fnr"), (True, False, "dnumber"), (False, True, "synthetic")]
)
def test_generated_pids_validate_under_both_rules(dnumber, synthetic, kind):
    seen = 0
    for day in (1, 15, 28, 31):
        birth = dt.date(1985, 1 if day == 31 else 5, day)
        for individual in range(0, 1000, 37):
            pid = norid.generate_pid(birth, individual, dnumber=dnumber, synthetic=synthetic)
            if pid is None:
                continue
            seen += 1
            assert norid.is_pid(pid) and norid.is_pid(pid, strict_k1=True), pid
            assert norid.pid_kind(pid) == kind
            # The definition: both full weighted sums divisible by 11.
            assert _weighted(pid, norid.K1_WEIGHTS + (1,)) % 11 == 0
            assert _weighted(pid, norid.K2_WEIGHTS + (1,)) % 11 == 0
    assert seen > 50


def test_generate_fnr_always_returns_a_valid_number():
    for year in range(1950, 2020, 7):
        pid = norid.generate_fnr(dt.date(year, 3, 9), 0)
        assert norid.is_pid(pid, strict_k1=True)
        assert pid.startswith(f"0903{year % 100:02d}")


def _with_k1_remainder(pid: str, remainder: int) -> str | None:
    """Change K1 so the K1 sum leaves ``remainder``, then recompute K2 (the 2032 rule)."""
    base = pid[:9]
    for k1 in range(10):
        if _weighted(base + str(k1), norid.K1_WEIGHTS + (1,)) % 11 == remainder:
            r = 11 - _weighted(base + str(k1), norid.K2_WEIGHTS) % 11
            k2 = 0 if r == 11 else r
            if k2 == 10:
                return None
            return base + str(k1) + str(k2)
    return None


@pytest.mark.parametrize("remainder", [1, 2, 3])
def test_2032_rule_accepts_k1_remainder_up_to_3(remainder):
    made = 0
    for individual in range(100, 400):
        pid = norid.generate_pid(dt.date(2032, 2, 14), individual)
        if pid is None:
            continue
        alt = _with_k1_remainder(pid, remainder)
        if alt is None:
            continue
        made += 1
        assert norid.is_pid(alt)
        assert not norid.is_pid(alt, strict_k1=True)
    assert made > 10


def test_k1_remainder_4_is_rejected():
    pid = norid.generate_fnr(dt.date(2001, 7, 4), 123)
    alt = None
    for individual in range(123, 400):
        alt = _with_k1_remainder(norid.generate_pid(dt.date(2001, 7, 4), individual) or pid, 4)
        if alt is not None:
            break
    assert alt is not None
    assert not norid.is_pid(alt)


@pytest.mark.parametrize("mutate", ["k2", "k1", "digit"])
def test_single_digit_changes_are_caught(mutate):
    pid = norid.generate_fnr(dt.date(1990, 12, 24), 345)
    pos = {"k2": 10, "k1": 9, "digit": 7}[mutate]
    wrong = pid[:pos] + str((int(pid[pos]) + 1) % 10) + pid[pos + 1 :]
    assert not norid.is_pid(wrong, strict_k1=True)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "1234567890",
        "123456789012",
        "0101011234a",
        None,
        1010112345,
        "00010112345",
        "32010112345",
        "01130112345",
    ],
)
def test_malformed_pids(value):
    assert not norid.is_pid(value)


@pytest.mark.parametrize("ddmm", ["0001", "3201", "0113", "0100", "7201", "0153", "0193"])
def test_pid_with_impossible_date_is_rejected_even_with_good_check_digits(ddmm):
    made = None
    for individual in range(1000):
        digits = [int(c) for c in f"{ddmm}85{individual:03d}"]
        k1 = norid._mod11(digits, norid.K1_WEIGHTS)
        k2 = norid._mod11(digits + [k1], norid.K2_WEIGHTS) if k1 is not None else None
        if k1 is not None and k2 is not None:
            made = "".join(map(str, digits)) + f"{k1}{k2}"
            break
    assert made is not None
    assert _weighted(made, norid.K2_WEIGHTS + (1,)) % 11 == 0  # check digits hold...
    assert not norid.is_pid(made)  # ...but the date does not


def test_generate_pid_rejects_bad_individual():
    with pytest.raises(ValueError):
        norid.generate_pid(dt.date(2000, 1, 1), 1000)
