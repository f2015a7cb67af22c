"""Telegram updates built with python-telegram-bot's own types, printed as the JSON the
Bot API sends (Update.to_dict()), each with the reply the gateway's echo agent should give
(null: the update is let go). Argument: the bot's user id and username."""

import json
import sys
from datetime import datetime, timezone

from telegram import Chat, Message, MessageEntity, PhotoSize, Sticker, Update, User

bot_id, bot_name = int(sys.argv[1]), sys.argv[2]
when = datetime(2026, 12, 1, tzinfo=timezone.utc)
alice = User(id=501, first_name="Alice", is_bot=False, username="alice")
bob = User(id=502, first_name="Bob", last_name="B", is_bot=False)
bot = User(id=bot_id, first_name="Hermes", is_bot=True, username=bot_name)
private = Chat(id=501, type=Chat.PRIVATE)
group = Chat(id=-1001234, type=Chat.SUPERGROUP, title="Team", is_forum=True)

out = []


def add(update_id, expect, **kw):
    out.append({"update": Update(update_id=update_id, **kw).to_dict(), "expect": expect})


add(1, "hello from PTB", message=Message(1, when, private, from_user=alice, text="hello from PTB"))
mention = f"@{bot_name} what time is it"
add(2, "what time is it", message=Message(
    2, when, group, from_user=bob, text=mention,
    entities=(MessageEntity(MessageEntity.MENTION, 0, len(bot_name) + 1),)))
add(3, None, message=Message(3, when, group, from_user=bob, text="just talking among us"))
earlier = Message(90, when, group, from_user=bot, text="an earlier answer")
add(4, "thanks!", message=Message(4, when, group, from_user=alice, text="thanks!",
                                 reply_to_message=earlier))
add(5, "look at this", message=Message(
    5, when, private, from_user=alice, caption="look at this",
    photo=(PhotoSize("f1", "u1", 90, 90),)))
add(6, None, message=Message(
    6, when, private, from_user=alice,
    sticker=Sticker("s1", "u2", 512, 512, False, False, Sticker.REGULAR)))
add(7, None, edited_message=Message(7, when, private, from_user=alice, text="edited text",
                                     edit_date=when))
add(8, "in the topic", message=Message(
    8, when, group, from_user=alice, text=f"@{bot_name} in the topic",
    message_thread_id=77, is_topic_message=True,
    entities=(MessageEntity(MessageEntity.MENTION, 0, len(bot_name) + 1),)))
add(9, None, message=Message(9, when, private, from_user=bot, text="from a bot"))

json.dump(out, sys.stdout)
