import os

import pytest

from filters.waf.engine import Ruleset, WafLoadError
from filters.waf.seclang import SecLangError, parse_actions, parse_text, split_args

from .conftest import crs_dir


def test_continuations_comments_and_quoting():
    text = '# comment\nSecRule ARGS "@rx a\\"b" \\\n    "id:1,\\\n    phase:2,pass"\n\n'
    (d,) = parse_text(text, "x.conf")
    assert d.name == "SecRule" and d.line == 2
    assert d.args == ["ARGS", '@rx a"b', "id:1,    phase:2,pass"]


def test_split_args_keeps_other_backslashes():
    assert split_args(r'ARGS "@rx \d+\s" "id:1"', "w") == ["ARGS", r"@rx \d+\s", "id:1"]


def test_parse_actions_single_quotes_and_commas():
    acts = parse_actions("id:5,msg:'a, b',t:none,t:lowercase,setvar:'tx.x=+%{tx.y}',nolog", "w")
    assert [(a.name, a.value) for a in acts] == [
        ("id", "5"),
        ("msg", "a, b"),
        ("t", "none"),
        ("t", "lowercase"),
        ("setvar", "tx.x=+%{tx.y}"),
        ("nolog", None),
    ]


def test_unknown_directive_names_file_and_line():
    with pytest.raises(SecLangError, match=r"r\.conf:3: unknown directive 'SecFrobnicate'"):
        parse_text("SecRuleEngine On\n\nSecFrobnicate On\n", "r.conf")


def test_ignored_directives_are_accepted():
    assert (
        parse_text('SecComponentSignature "x"\nSecCollectionTimeout 600\nSecAuditEngine On\n', "r.conf") == []
    )


def test_unknown_action_and_operator_are_load_errors():
    with pytest.raises(WafLoadError, match=r"<string>:1: SecRule: unknown action 'bogus'"):
        Ruleset.from_text('SecRule ARGS "@rx a" "id:1,bogus"')
    with pytest.raises(WafLoadError, match="unknown operator @nope"):
        Ruleset.from_text('SecRule ARGS "@nope a" "id:1"')
    with pytest.raises(WafLoadError, match="unknown variable"):
        Ruleset.from_text('SecRule NOT_A_VAR "@rx a" "id:1"')
    with pytest.raises(WafLoadError, match="chain without a following rule"):
        Ruleset.from_text('SecRule ARGS "@rx a" "id:1,chain"')


def test_include_relative_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.conf").write_text('SecRule ARGS "@rx a" "id:11,pass"\n')
    (tmp_path / "sub" / "b.conf").write_text('SecRule ARGS "@rx b" "id:12,pass"\n')
    main = tmp_path / "main.conf"
    main.write_text("Include sub/*.conf\n")
    rs = Ruleset.load([str(main)])
    assert sorted(rs.by_id) == [11, 12]


def test_remove_and_update_target_directives():
    rs = Ruleset.from_text(
        'SecRule ARGS "@rx a" "id:1,pass,tag:t1"\n'
        'SecRule ARGS "@rx b" "id:2,pass,tag:t2"\n'
        'SecRule ARGS "@rx c" "id:3,pass"\n'
        "SecRuleRemoveById 1\n"
        "SecRuleRemoveByTag t2\n"
        'SecRuleUpdateTargetById 3 "!ARGS:foo|REQUEST_HEADERS:X"\n'
    )
    assert sorted(rs.by_id) == [3]
    r = rs.by_id[3]
    assert [(t.coll, t.key) for t in r.targets] == [("ARGS", None), ("REQUEST_HEADERS", "x")]
    assert [(e.coll, e.key) for e in r.excludes] == [("ARGS", "foo")]


@pytest.mark.e2e
def test_all_crs_files_load():
    d = crs_dir()
    rs = Ruleset.load(
        sorted(
            os.path.join(d, "rules", f) for f in os.listdir(os.path.join(d, "rules")) if f.endswith(".conf")
        ),
        prefilter="off",
    )
    assert len(rs.by_id) > 500
    assert 942100 in rs.by_id and 949110 in rs.by_id
