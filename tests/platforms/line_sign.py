"""Signs LINE webhook bodies the way the LINE Platform does, and has line-bot-sdk check each
one: stdin is {"secret": ..., "bodies": [text, ...]}; stdout the list of X-Line-Signature
values. Every signature is accepted by the SDK's SignatureValidator, and every body parsed
by its WebhookParser, before it is printed; a body the SDK refuses fails the script."""

import base64
import hashlib
import hmac
import json
import sys

from linebot.v3.webhook import SignatureValidator, WebhookParser

job = json.load(sys.stdin)
secret = job["secret"]
validator = SignatureValidator(secret)
parser = WebhookParser(secret)
out = []
for body in job["bodies"]:
    sig = base64.b64encode(
        hmac.new(secret.encode("utf-8"), body.encode("utf-8"), hashlib.sha256).digest()
    ).decode("ascii")
    assert validator.validate(body, sig), "line-bot-sdk refuses the signature"
    if job.get("parse", True):
        parser.parse(body, sig)
    out.append(sig)
json.dump(out, sys.stdout)
