"""TF Serving's REST predict format for the `serving_default` signature (one string input `image_bytes`).

Row format:      {"instances": [{"image_bytes": {"b64": "..."}}, ...]}   (or [{"b64": "..."}]: one named input)
                 -> {"predictions": [{"probabilities": [...], "findings": [...]}, ...]}
Columnar format: {"inputs": {"image_bytes": [{"b64": "..."}, ...]}}     (or {"inputs": [{"b64": "..."}]})
                 -> {"outputs": {"probabilities": [[...]], "findings": [[...]]}}
Binary strings travel base64-encoded under the key "b64", as TF Serving requires.
A model with patient features has the inputs image_bytes, age, sex and view: each instance names all four
({"image_bytes": {"b64": ...}, "age": 58, "sex": "M", "view": "PA"}; age null = unknown), or "inputs" holds four
lists of the same length.
"""

import base64
import binascii
import json
import re

SIGNATURE = "serving_default"
INPUT = "image_bytes"
PATIENT_INPUTS = ("age", "sex", "view")  # cxrkeras.export.serving.PATIENT_INPUTS, without importing TensorFlow
OUTPUTS = ("probabilities", "findings")


class RequestError(Exception):
    """A malformed request: the message says what is wrong and what to send (HTTP 400)."""


_EXAMPLE = '{"instances": [{"image_bytes": {"b64": "<base64 of a PNG or JPEG file>"}}]}'


def parse_request(body, max_items, patient=False):
    """(items, "row" | "columnar") of a predict request body (bytes): image bytes, or with `patient` (a model with
    patient features) (image bytes, (age, sex, view)) per image."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        where = f" ({exc.msg} at line {exc.lineno} column {exc.colno})" if isinstance(exc, json.JSONDecodeError) \
            else ""
        raise RequestError(f"the request body is not JSON{where}; send {_EXAMPLE}") from None
    if not isinstance(doc, dict):
        raise RequestError(f"the request body must be a JSON object; send {_EXAMPLE}")
    signature = doc.get("signature_name", SIGNATURE)
    if signature != SIGNATURE:
        raise RequestError(f"signature_name {str(signature)[:64]!r}: this server serves {SIGNATURE!r} only "
                           f"(image bytes in); run TF Serving on the export for 'predict_images'")
    unknown = sorted(set(doc) - {"instances", "inputs", "signature_name"})
    if unknown:
        raise RequestError(f"unknown key(s) {', '.join(repr(k[:32]) for k in unknown[:5])}: a predict request has "
                           f"'instances' (row format) or 'inputs' (columnar format)")
    if ("instances" in doc) == ("inputs" in doc):
        raise RequestError(f"give exactly one of 'instances' (row format) or 'inputs' (columnar format): {_EXAMPLE}")
    if patient:
        return _parse_with_patient(doc, max_items)
    if "instances" in doc:
        items, fmt = doc["instances"], "row"
        if not isinstance(items, list):
            raise RequestError("'instances' must be a list, one item per image")
        where = "instances[{}]"
        items = [_unwrap_row(item, where.format(i)) for i, item in enumerate(items[:max_items + 1])]
    else:
        items, fmt = doc["inputs"], "columnar"
        if isinstance(items, dict):
            if set(items) != {INPUT}:
                raise RequestError(f"'inputs' has the key(s) {', '.join(repr(k[:32]) for k in list(items)[:5])}; "
                                   f"the signature's only input is {INPUT!r}")
            items = items[INPUT]
        if not isinstance(items, list):
            raise RequestError(f"'inputs' must hold a list of images ({{\"{INPUT}\": [{{\"b64\": ...}}, ...]}})")
        where = "inputs[{}]"
    if not items:
        raise RequestError("the request holds no image: send at least one")
    if len(items) > max_items:
        raise RequestError(f"the request holds more than {max_items} images, the limit of one request "
                           f"(--max-images); send them in several requests")
    return [_decode(item, where.format(i)) for i, item in enumerate(items)], fmt


_PATIENT_EXAMPLE = ('{"instances": [{"image_bytes": {"b64": "<base64 of a PNG or JPEG file>"}, "age": 58, "sex": "M", '
                    '"view": "PA"}]}')
NAMES = (INPUT,) + PATIENT_INPUTS


def _parse_with_patient(doc, max_items):
    """Items (bytes, (age, sex, view)) of a request to a model with patient features."""
    if "instances" in doc:
        rows, fmt = doc["instances"], "row"
        if not isinstance(rows, list):
            raise RequestError("'instances' must be a list, one item per image")
        columns = None
        for i, row in enumerate(rows[:max_items + 1]):
            if not isinstance(row, dict) or set(row) != set(NAMES):
                have = ", ".join(repr(k[:32]) for k in row) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
                raise RequestError(f"instances[{i}] has {have or 'no key'}; this model's inputs are "
                                   f"{', '.join(NAMES)}: send {_PATIENT_EXAMPLE}")
        columns = {name: [row[name] for row in rows[:max_items + 1]] for name in NAMES}
    else:
        fmt, columns = "columnar", doc["inputs"]
        if not isinstance(columns, dict) or set(columns) != set(NAMES):
            raise RequestError(f"'inputs' must be an object with the lists {', '.join(NAMES)} (this model's inputs)")
        lengths = {name: len(v) if isinstance(v, list) else None for name, v in columns.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            got = ", ".join(f"{k}: {'not a list' if v is None else v}" for k, v in lengths.items())
            raise RequestError(f"'inputs' must hold lists of the same length, one value per image; got {got}")
    n = len(columns[INPUT])
    if not n:
        raise RequestError("the request holds no image: send at least one")
    if n > max_items:
        raise RequestError(f"the request holds more than {max_items} images, the limit of one request "
                           f"(--max-images); send them in several requests")
    where = ("instances[{}]." if fmt == "row" else "inputs.{}").format
    items = []
    for i in range(n):
        blob = _decode(columns[INPUT][i], f"{where(i)}{INPUT}" if fmt == "row" else f"inputs.{INPUT}[{i}]")
        age, sex, view = (columns[name][i] for name in PATIENT_INPUTS)
        at = (lambda name: f"instances[{i}].{name}" if fmt == "row" else f"inputs.{name}[{i}]")  # noqa: E731
        if age is not None and (isinstance(age, bool) or not isinstance(age, (int, float))):
            raise RequestError(f"{at('age')}: expected a number of years (or null when unknown)")
        for name, value in (("sex", sex), ("view", view)):
            if value is not None and not isinstance(value, str):
                raise RequestError(f"{at(name)}: expected a string (or null when unknown)")
        items.append((blob, (age, sex or "", view or "")))
    return items, fmt


def _unwrap_row(item, where):
    if isinstance(item, dict) and INPUT in item:
        if len(item) > 1:
            others = ", ".join(repr(k[:32]) for k in item if k != INPUT)
            raise RequestError(f"{where} has the key(s) {others} besides {INPUT!r}; the signature has one input")
        return item[INPUT]
    return item  # one named input: TF Serving accepts the value itself


def _decode(value, where):
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        text = value["b64"]
        try:
            if re.search(r"[-_]", text):  # the URL-safe alphabet
                return base64.urlsafe_b64decode(text.encode("ascii"))
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise RequestError(f"{where}: the 'b64' value is not valid base64 ({len(text)} characters)") from None
    if isinstance(value, str):
        raise RequestError(f"{where}: a plain string; image bytes are binary and must be sent as {{\"b64\": "
                           f"\"<base64>\"}}")
    raise RequestError(f"{where}: expected {{\"b64\": \"<base64 of a PNG or JPEG file>\"}}, got a JSON "
                       f"{type(value).__name__ if not isinstance(value, dict) else 'object with other keys'}")


def format_response(probs, found, fmt):
    """The response document of TF Serving for this request format."""
    probs = [[float(p) for p in row] for row in probs]
    found = [[bool(f) for f in row] for row in found]
    if fmt == "columnar":
        return {"outputs": {"probabilities": probs, "findings": found}}
    return {"predictions": [{"probabilities": p, "findings": f} for p, f in zip(probs, found)]}


def item_message(index, reason):
    """TF Serving's serving_default names a bad item `image_bytes[i]` (or `sex[i]`, ... for a patient field): the
    same words, i within this request."""
    if index is None:
        return reason
    field, _, rest = reason.partition(": ")
    if field in PATIENT_INPUTS and rest:
        return f"{field}[{index}]: {rest}"
    return f"{INPUT}[{index}]: {reason}"
