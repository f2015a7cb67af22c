"""LINE webhook bodies built with line-bot-sdk's own models (linebot.v3.webhooks), printed
as the JSON the LINE Platform sends, each with the reply the gateway's echo agent should
give (null: let go) and where it goes. Argument: the bot's user id."""

import json
import sys

from linebot.v3.webhooks import (
    CallbackRequest,
    DeliveryContext,
    FollowDetail,
    FollowEvent,
    GroupSource,
    ImageMessageContent,
    ContentProvider,
    Mention,
    MessageEvent,
    RoomSource,
    StickerMessageContent,
    TextMessageContent,
    UserMentionee,
    UserSource,
)

bot = sys.argv[1]
alice = "U" + "a" * 32
bob = "U" + "b" * 32
group = "C" + "c" * 32
room = "R" + "d" * 32
n = 0


def ctx(redelivery=False):
    return DeliveryContext(is_redelivery=redelivery)


def event_id():
    global n
    n += 1
    return "01HLINEEVENT%014d" % n


def text(source, words, mention=None, redelivery=False, eid=None, mode="active"):
    msg = TextMessageContent(id=str(7000 + n), text=words, quote_token="q%d" % n, mention=mention)
    return MessageEvent(
        type="message", source=source, timestamp=1767225600000 + n, mode=mode,
        webhook_event_id=eid or event_id(), delivery_context=ctx(redelivery),
        reply_token="r%d" % n, message=msg)


cases = []


def add(events, expect):
    body = CallbackRequest(destination=bot, events=events)
    cases.append({"body": body.to_json(), "expect": expect})


hello = text(UserSource(user_id=alice), "hello from the SDK")
add([hello], [{"to": alice, "text": "hello from the SDK"}])
# LINE redelivers the same event (same webhookEventId): answered once.
again = text(UserSource(user_id=alice), "hello from the SDK", redelivery=True,
             eid=hello.webhook_event_id)
add([again], [])
mention = Mention(mentionees=[UserMentionee(index=0, length=7, user_id=bot, is_self=True)])
add([text(GroupSource(group_id=group, user_id=bob), "@Hermes what time is it", mention=mention)],
    [{"to": group, "text": "[%s] what time is it" % bob}])
add([text(GroupSource(group_id=group, user_id=bob), "just talking among us")], [])
other = Mention(mentionees=[UserMentionee(index=0, length=6, user_id=alice, is_self=False)])
add([text(GroupSource(group_id=group, user_id=bob), "@Alice look", mention=other)], [])
add([text(RoomSource(room_id=room, user_id=alice), "@Hermes in a room", mention=mention)],
    [{"to": room, "text": "[%s] in a room" % alice}])
# Several events in one request, one of them let go.
sticker = MessageEvent(
    type="message", source=UserSource(user_id=bob), timestamp=1767225600000, mode="active",
    webhook_event_id=event_id(), delivery_context=ctx(), reply_token="rs",
    message=StickerMessageContent(id="8001", package_id="1", sticker_id="2",
                                  sticker_resource_type="STATIC", quote_token="qs"))
image = MessageEvent(
    type="message", source=UserSource(user_id=bob), timestamp=1767225600000, mode="active",
    webhook_event_id=event_id(), delivery_context=ctx(), reply_token="ri",
    message=ImageMessageContent(id="8002", content_provider=ContentProvider(type="line"),
                                quote_token="qi"))
follow = FollowEvent(type="follow", source=UserSource(user_id=bob), timestamp=1767225600000,
                     mode="active", webhook_event_id=event_id(), delivery_context=ctx(),
                     reply_token="rf", follow=FollowDetail(is_unblocked=False))
add([sticker, text(UserSource(user_id=bob), "first of two"), image, follow,
     text(UserSource(user_id=bob), "second of two")],
    [{"to": bob, "text": "first of two"}, {"to": bob, "text": "second of two"}])
add([text(UserSource(user_id=bob), "standby is not ours", mode="standby")], [])

json.dump(cases, sys.stdout)
