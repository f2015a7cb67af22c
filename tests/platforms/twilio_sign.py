"""Signs Twilio webhook requests with the twilio library's own RequestValidator: stdin is
{"token": ..., "requests": [{"url": ..., "params": [[name, value], ...]}, ...]}; stdout the
list of X-Twilio-Signature values (compute_signature), each one checked with validate()."""

import json
import sys

from twilio.request_validator import RequestValidator

job = json.load(sys.stdin)
validator = RequestValidator(job["token"])
out = []
for r in job["requests"]:
    params = dict(r["params"])
    sig = validator.compute_signature(r["url"], params)
    assert validator.validate(r["url"], params, sig), "twilio refuses its own signature"
    out.append(sig)
json.dump(out, sys.stdout)
