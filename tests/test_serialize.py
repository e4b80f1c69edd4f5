"""Tests of qbound.serialize: strict JSON out (no bare NaN or Infinity), clear errors for foreign JSON in."""

import doctest
import json
import math
import warnings

import numpy as np
import pytest

import qbound as qb
from qbound import serialize


def strict_loads(text):
  """json.loads that refuses the bare NaN/Infinity words, as JSON readers other than Python's do."""
  def refuse(word):
    raise ValueError(f"bare {word} in JSON")

  return json.loads(text, parse_constant=refuse)


def certificate(**changes):
  fields = dict(lower=0.5, upper=1.0, diff_lower=np.array([-1.0, -0.25]), diff_upper=np.array([0.75, 1.0]),
                witness=np.array([0.1, 0.2, 0.3]), method="crown", seconds=0.5, bounds={"crown": 1.0}, sound=True,
                lower_float32=0.5, witness_diff=np.array([0.5, -0.1]), box_lower=np.zeros(3), box_upper=np.ones(3))
  fields.update(changes)
  return qb.Certificate(**fields)


def batch(**changes):
  n = 3
  fields = dict(upper=np.array([1.0, 2.0, 3.0]), lower=np.array([0.5, 1.0, 1.5]), diff_lower=-np.ones((n, 2)),
                diff_upper=np.ones((n, 2)), witness=np.zeros((n, 4)), seconds=np.full(n, 0.1), method="diff",
                bounds={"diff": np.array([1.0, 2.0, 3.0])}, sound=True, lower_float32=np.array([0.5, 1.0, 1.5]),
                witness_diff=np.zeros((n, 2)), box_lower=np.zeros((n, 4)), box_upper=np.ones((n, 4)),
                compile_seconds=1.0, total_seconds=2.0, layout={"devices": 1})
  fields.update(changes)
  return qb.BatchCertificate(**fields)


def test_infinite_and_nan_numbers_are_strict_json_and_come_back():
  with pytest.warns(qb.InfiniteBoundWarning, match="upper bound is inf"):
    cert = certificate(upper=math.inf, diff_lower=np.array([-math.inf, 0.0]), diff_upper=np.array([math.inf, 1.0]),
                       bounds={"interval": math.inf}, lower_float32=math.nan)
  text = cert.to_json(indent=1)
  data = strict_loads(text)  # no bare NaN or Infinity anywhere
  assert data["upper"] == "Infinity" and data["diff_lower"][0] == "-Infinity" and data["lower_float32"] == "NaN"
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # reading it back does not warn again
    back = qb.Certificate.from_json(text)
  assert back.upper == math.inf and math.isnan(back.lower_float32) and back.bounds == {"interval": math.inf}
  np.testing.assert_array_equal(back.diff_lower, [-math.inf, 0.0])
  # Files written before the strict encoding (Python's bare words) still read.
  old = json.dumps(cert.to_dict())
  assert "Infinity" in old and qb.Certificate.from_json(old).upper == math.inf


def test_batch_round_trip_with_infinite_bounds():
  with pytest.warns(qb.InfiniteBoundWarning, match="for 1 of 3 boxes"):
    b = batch(upper=np.array([1.0, math.inf, 3.0]), bounds={"diff": np.array([1.0, math.inf, 3.0])})
  text = b.to_json()
  strict_loads(text)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    back = qb.BatchCertificate.from_json(text)
    assert back[1].upper == math.inf  # box 1's certificate: the batch warned already
  np.testing.assert_array_equal(back.upper, b.upper)
  np.testing.assert_array_equal(back.bounds["diff"], b.bounds["diff"])
  assert back.layout == {"devices": 1}


def test_nan_bounds_never_make_a_certificate():
  with pytest.raises(qb.BoundOverflowError, match="upper bound is NaN"):
    certificate(upper=math.nan)
  with pytest.raises(qb.BoundOverflowError, match="reached error .* is NaN"):
    certificate(lower=math.nan)
  with pytest.raises(qb.BoundOverflowError, match="upper bound is NaN for box 2"):
    batch(upper=np.array([1.0, 2.0, math.nan]))
  assert isinstance(qb.BoundOverflowError("x"), ValueError)
  # Nor do they come in through JSON.
  with pytest.raises(ValueError, match="NaN"):
    qb.Certificate.from_dict({**certificate().to_dict(), "upper": "NaN"})


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "expected a JSON object of fields, got a list"),
    ('"certificate"', "got the string 'certificate'"),
    ("17", "got int 17"),
    ("null", "got null"),
    ("{}", "missing fields ['lower', 'upper'"),
    ("{not json", "the text is not JSON"),
    ("", "the text is not JSON"),
])
def test_foreign_json_is_refused_saying_what_is_wrong(text, message):
  with pytest.raises(ValueError, match="not a qbound certificate") as err:
    qb.Certificate.from_json(text)
  assert message in str(err.value)


@pytest.mark.parametrize("field, value, message", [
    ("upper", "x", "field 'upper' must be a number, got the string 'x'"),
    ("upper", True, "field 'upper' must be a number, got true"),
    ("upper", [1.0], "field 'upper' must be a number, got a list"),
    ("witness", [[1.0], [2.0, 3.0]], "field 'witness' must be a (nested) list of numbers, got a ragged"),
    ("witness", ["a", 1.0], "got a list holding the string 'a'"),
    ("witness", {"x": 1}, "got an object"),
    ("method", 3, "field 'method' must be a string, got int 3"),
    ("bounds", [1.0], "field 'bounds' must be an object of numbers, got a list"),
    ("bounds", {"crown": "high"}, "field 'bounds' must be an object of numbers"),
    ("sound", "yes", "field 'sound' must be true or false, got the string 'yes'"),
    ("colour", "red", "unknown fields ['colour']"),
])
def test_fields_of_the_wrong_kind_are_named(field, value, message):
  data = {**certificate().to_dict(), field: value}
  with pytest.raises(ValueError) as err:
    qb.Certificate.from_dict(data)
  assert message in str(err.value), str(err.value)
  with pytest.raises(ValueError, match="not a qbound certificate"):
    qb.Certificate.from_json(json.dumps(data))


def test_optional_fields_may_be_missing_or_null():
  data = certificate().to_dict()
  for name in ("bounds", "sound", "lower_float32", "witness_diff", "box_lower", "box_upper"):
    del data[name]
  cert = qb.Certificate.from_dict(data)
  assert cert.bounds == {} and cert.sound is True and cert.box_lower is None
  cert = qb.Certificate.from_dict({**certificate().to_dict(), "sound": None, "box_lower": None})
  assert cert.sound is True and cert.box_lower is None


def test_batch_certificate_refuses_foreign_json():
  with pytest.raises(ValueError, match="not a qbound batch certificate: expected a JSON object"):
    qb.BatchCertificate.from_json("[]")
  with pytest.raises(ValueError, match="one number: a one-box certificate.*Certificate.from_json"):
    qb.BatchCertificate.from_json(certificate().to_json())
  with pytest.raises(ValueError, match="missing fields \\['upper', 'lower'"):
    qb.BatchCertificate.from_json('{"method": "diff"}')
  data = batch().to_dict()
  with pytest.raises(ValueError, match="one row per box.*lower \\(2,\\)"):
    qb.BatchCertificate.from_dict({**data, "lower": [0.5, 1.0]})
  with pytest.raises(ValueError, match="one row per box.*bounds\\['diff'\\]"):
    qb.BatchCertificate.from_dict({**data, "bounds": {"diff": [1.0]}})
  with pytest.raises(ValueError, match="field 'layout' must be an object"):
    qb.BatchCertificate.from_dict({**data, "layout": [1]})
  with pytest.raises(TypeError, match="must be a str"):
    qb.BatchCertificate.from_json(data)


def test_docstring_examples():
  result = doctest.testmod(serialize, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
