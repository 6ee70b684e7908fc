"""Generate data/general.jsonl and data/general_eval.jsonl (run: python data/make_general.py).

The general set is what the tiny demo base learns and what replay/retention is
measured on. Every fact is written here by hand and asked in three phrasings:
two go to the training file, the third (a different wording) only to the
held-out eval file, so "general retention" means answering a known fact asked
in a new way, not recalling a memorised line. Answers are short so a tiny model
can memorise a useful share of them in CPU minutes.

Eval rows carry `answer`: the short string a correct reply must contain.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (country en, capital en, country zh, capital zh)
CAPITALS = [
    ("France", "Paris", "法国", "巴黎"),
    ("Japan", "Tokyo", "日本", "东京"),
    ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"),
    ("Spain", "Madrid", "西班牙", "马德里"),
    ("China", "Beijing", "中国", "北京"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Egypt", "Cairo", "埃及", "开罗"),
    ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Brazil", "Brasilia", "巴西", "巴西利亚"),
    ("India", "New Delhi", "印度", "新德里"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
    ("Greece", "Athens", "希腊", "雅典"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本"),
    ("Norway", "Oslo", "挪威", "奥斯陆"),
    ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"),
    ("Poland", "Warsaw", "波兰", "华沙"),
    ("Thailand", "Bangkok", "泰国", "曼谷"),
    ("Vietnam", "Hanoi", "越南", "河内"),
    ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
    ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯"),
    ("Peru", "Lima", "秘鲁", "利马"),
    ("Ireland", "Dublin", "爱尔兰", "都柏林"),
    ("Austria", "Vienna", "奥地利", "维也纳"),
    ("Turkey", "Ankara", "土耳其", "安卡拉"),
    ("Iran", "Tehran", "伊朗", "德黑兰"),
    ("Cuba", "Havana", "古巴", "哈瓦那"),
    ("Finland", "Helsinki", "芬兰", "赫尔辛基"),
    ("Denmark", "Copenhagen", "丹麦", "哥本哈根"),
]

# (english word, chinese word)
WORDS = [
    ("water", "水"), ("fire", "火"), ("apple", "苹果"), ("book", "书"), ("cat", "猫"),
    ("dog", "狗"), ("moon", "月亮"), ("sun", "太阳"), ("tree", "树"), ("house", "房子"),
    ("rice", "米饭"), ("tea", "茶"), ("friend", "朋友"), ("school", "学校"), ("teacher", "老师"),
    ("computer", "电脑"), ("mountain", "山"), ("river", "河"), ("flower", "花"), ("bird", "鸟"),
    ("red", "红色"), ("green", "绿色"), ("music", "音乐"), ("city", "城市"), ("money", "钱"),
]

# (word en, opposite en, word zh, opposite zh)
OPPOSITES = [
    ("hot", "cold", "热", "冷"), ("big", "small", "大", "小"), ("up", "down", "上", "下"),
    ("fast", "slow", "快", "慢"), ("old", "new", "旧", "新"), ("day", "night", "白天", "黑夜"),
    ("open", "closed", "开", "关"), ("happy", "sad", "高兴", "难过"), ("light", "dark", "亮", "暗"),
    ("early", "late", "早", "晚"), ("high", "low", "高", "低"), ("full", "empty", "满", "空"),
    ("strong", "weak", "强", "弱"), ("long", "short", "长", "短"), ("rich", "poor", "富", "穷"),
]

# (q1, q2, held-out paraphrase, answer, must-contain) — common knowledge, en + zh.
FACTS = [
    ("How many days are in a week?", "How many days does a week have?",
     "A week has how many days?", "Seven.", "Seven"),
    ("How many hours are in a day?", "How many hours does a day have?",
     "A day has how many hours?", "24 hours.", "24"),
    ("How many minutes are in an hour?", "How many minutes does an hour have?",
     "An hour has how many minutes?", "60 minutes.", "60"),
    ("How many months are in a year?", "How many months does a year have?",
     "A year has how many months?", "Twelve.", "Twelve"),
    ("What is the chemical formula of water?", "Give the chemical formula for water.",
     "Water's chemical formula is what?", "H2O.", "H2O"),
    ("What gas do plants absorb from the air?", "Which gas do plants take in from the air?",
     "Plants absorb which gas from the air?", "Carbon dioxide.", "Carbon dioxide"),
    ("What is the largest planet in the solar system?", "Which planet is the largest in the solar system?",
     "Name the largest planet of the solar system.", "Jupiter.", "Jupiter"),
    ("Which planet is closest to the sun?", "What planet is nearest to the sun?",
     "Name the planet closest to the sun.", "Mercury.", "Mercury"),
    ("What is the largest ocean on Earth?", "Which ocean is the largest on Earth?",
     "Name the largest ocean on Earth.", "The Pacific Ocean.", "Pacific"),
    ("At what temperature does water boil at sea level?", "What is the boiling point of water at sea level?",
     "Water boils at what temperature at sea level?", "100 degrees Celsius.", "100"),
    ("At what temperature does water freeze?", "What is the freezing point of water?",
     "Water freezes at what temperature?", "0 degrees Celsius.", "0 degrees"),
    ("How many legs does a spider have?", "How many legs do spiders have?",
     "A spider has how many legs?", "Eight.", "Eight"),
    ("How many continents are there?", "How many continents does Earth have?",
     "Earth has how many continents?", "Seven.", "Seven"),
    ("What color is the sky on a clear day?", "What colour is a clear daytime sky?",
     "On a clear day the sky is what color?", "Blue.", "Blue"),
    ("Who wrote Romeo and Juliet?", "Who is the author of Romeo and Juliet?",
     "Romeo and Juliet was written by whom?", "William Shakespeare.", "Shakespeare"),
    ("What is the fastest land animal?", "Which land animal is the fastest?",
     "Name the fastest land animal.", "The cheetah.", "cheetah"),
    ("What do bees make?", "What food do bees produce?",
     "Bees produce what?", "Honey.", "Honey"),
    ("What is the square root of 81?", "What is the square root of eighty-one?",
     "The square root of 81 is?", "9.", "9"),
    ("How many sides does a triangle have?", "How many sides do triangles have?",
     "A triangle has how many sides?", "Three.", "Three"),
    ("How many sides does a hexagon have?", "How many sides do hexagons have?",
     "A hexagon has how many sides?", "Six.", "Six"),
    ("What is the main language of Brazil?", "What language do people speak in Brazil?",
     "Brazilians mainly speak which language?", "Portuguese.", "Portuguese"),
    ("What does CPU stand for?", "What is CPU short for?",
     "CPU is an abbreviation of what?", "Central Processing Unit.", "Central Processing Unit"),
    ("What does HTML stand for?", "What is HTML short for?",
     "HTML is an abbreviation of what?", "HyperText Markup Language.", "HyperText Markup Language"),
    ("一周有几天？", "一个星期有多少天？", "一星期共有几天？", "七天。", "七"),
    ("一天有多少小时？", "一天有几个小时？", "一昼夜共有多少小时？", "24小时。", "24"),
    ("一年有几个月？", "一年有多少个月？", "一年共有几个月？", "十二个月。", "十二"),
    ("水的化学式是什么？", "水的化学式怎么写？", "请写出水的化学式。", "H2O。", "H2O"),
    ("太阳系最大的行星是哪个？", "太阳系中最大的行星是什么？", "哪颗行星是太阳系最大的？", "木星。", "木星"),
    ("离太阳最近的行星是哪个？", "哪颗行星离太阳最近？", "最靠近太阳的行星是什么？", "水星。", "水星"),
    ("地球上最大的海洋是什么？", "哪个海洋是地球上最大的？", "世界上最大的大洋是哪个？", "太平洋。", "太平洋"),
    ("水在多少度沸腾？", "水的沸点是多少度？", "标准大气压下水几度会开？", "100摄氏度。", "100"),
    ("蜘蛛有几条腿？", "蜘蛛有多少条腿？", "一只蜘蛛长几条腿？", "八条腿。", "八"),
    ("《红楼梦》的作者是谁？", "谁写了《红楼梦》？", "《红楼梦》是谁写的？", "曹雪芹。", "曹雪芹"),
    ("蜜蜂酿什么？", "蜜蜂能产出什么？", "蜜蜂会酿造什么东西？", "蜂蜜。", "蜂蜜"),
    ("三角形有几条边？", "三角形有多少条边？", "一个三角形共有几条边？", "三条边。", "三"),
    ("中国最长的河流是什么？", "中国最长的河是哪条？", "哪条河是中国最长的？", "长江。", "长江"),
    ("晴天的天空是什么颜色？", "晴朗的天空是什么颜色的？", "天气晴朗时天空呈什么颜色？", "蓝色。", "蓝"),
]

# (q1, q2, held-out paraphrase, answer, must-contain) — tiny Python snippets.
CODE = [
    ("Write a Python function that returns the square of x.",
     "In Python, write a function square(x) that squares x.",
     "Give me a Python function to square a number x.",
     "def square(x):\n    return x * x", "return x * x"),
    ("Write a Python function that adds two numbers a and b.",
     "In Python, write a function add(a, b) that returns their sum.",
     "Give me a Python function that sums a and b.",
     "def add(a, b):\n    return a + b", "return a + b"),
    ("How do you print hello in Python?", "Show the Python code that prints hello.",
     "What Python statement prints hello?", "print(\"hello\")", "print(\"hello\")"),
    ("How do you get the length of a list xs in Python?", "Which Python call gives the length of list xs?",
     "In Python, how do I find how many items the list xs has?", "len(xs)", "len(xs)"),
    ("How do you reverse a string s in Python?", "Show Python code that reverses the string s.",
     "In Python, what expression reverses the string s?", "s[::-1]", "s[::-1]"),
    ("How do you sort a list xs in Python?", "Show Python code that sorts the list xs.",
     "In Python, what returns the list xs sorted?", "sorted(xs)", "sorted(xs)"),
    ("How do you turn the string s into upper case in Python?", "Show Python code that makes s upper case.",
     "In Python, what converts the string s to capitals?", "s.upper()", "s.upper()"),
    ("How do you read a file named data.txt in Python?", "Show Python code that reads data.txt.",
     "In Python, how do I load the text of data.txt?",
     "open(\"data.txt\").read()", "open(\"data.txt\")"),
    ("用Python怎么打印你好？", "Python中如何输出你好？", "写一行Python代码打印你好。", "print(\"你好\")", "print(\"你好\")"),
    ("用Python怎么求列表xs的长度？", "Python中如何得到列表xs的长度？", "写Python代码计算列表xs有多少个元素。", "len(xs)", "len(xs)"),
]

# Additions asked in English and Chinese: (a, b).
SUMS = [(2, 3), (4, 5), (7, 8), (6, 6), (9, 1), (3, 4), (5, 7), (8, 2), (10, 10), (12, 5),
        (15, 3), (11, 9), (20, 7), (13, 4), (6, 9)]
# Multiplications: (a, b).
PRODUCTS = [(2, 3), (3, 4), (5, 5), (6, 7), (8, 8), (9, 3), (4, 7), (7, 7), (6, 5), (9, 9)]


def row(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def eval_row(q: str, a: str, must: str, kind: str, lang: str) -> dict:
    return {**row(q, a), "answer": must, "kind": kind, "lang": lang}


def build() -> tuple[list[dict], list[dict]]:
    train: list[dict] = []
    held: list[dict] = []
    for c_en, cap_en, c_zh, cap_zh in CAPITALS:
        train += [row(f"What is the capital of {c_en}?", f"{cap_en}."),
                  row(f"Which city is the capital of {c_en}?", f"The capital of {c_en} is {cap_en}."),
                  row(f"{c_zh}的首都是哪里？", f"{cap_zh}。"),
                  row(f"{c_zh}的首都是哪个城市？", f"{c_zh}的首都是{cap_zh}。")]
        held += [eval_row(f"Name the capital city of {c_en}.", f"{cap_en}.", cap_en, "capital", "en"),
                 eval_row(f"请问{c_zh}的首都叫什么？", f"{cap_zh}。", cap_zh, "capital", "zh")]
    for en, zh in WORDS:
        train += [row(f"How do you say \"{en}\" in Chinese?", f"{zh}"),
                  row(f"Translate \"{en}\" into Chinese.", f"\"{en}\" in Chinese is {zh}."),
                  row(f"“{zh}”用英语怎么说？", f"{en}"),
                  row(f"把“{zh}”翻译成英文。", f"“{zh}”的英文是 {en}。")]
        held += [eval_row(f"What is the Chinese word for \"{en}\"?", zh, zh, "translate", "en"),
                 eval_row(f"“{zh}”的英文单词是什么？", en, en, "translate", "zh")]
    for w_en, o_en, w_zh, o_zh in OPPOSITES:
        train += [row(f"What is the opposite of \"{w_en}\"?", f"{o_en.capitalize()}."),
                  row(f"Give the antonym of \"{w_en}\".", f"The opposite of {w_en} is {o_en}."),
                  row(f"“{w_zh}”的反义词是什么？", f"{o_zh}。"),
                  row(f"说出“{w_zh}”的反义词。", f"“{w_zh}”的反义词是“{o_zh}”。")]
        held += [eval_row(f"Which word means the opposite of \"{w_en}\"?", f"{o_en.capitalize()}.", o_en,
                          "opposite", "en"),
                 eval_row(f"“{w_zh}”的相反词是什么？", f"{o_zh}。", o_zh, "opposite", "zh")]
    for q1, q2, q3, ans, must in FACTS + CODE:
        lang = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in q1) else "en"
        kind = "code" if (q1, q2, q3, ans, must) in CODE else "fact"
        train += [row(q1, ans), row(q2, ans)]
        held.append(eval_row(q3, ans, must, kind, lang))
    for a, b in SUMS:
        train += [row(f"What is {a} + {b}?", f"{a + b}"),
                  row(f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。")]
        held.append(eval_row(f"What is {a} plus {b}?", f"{a + b}", str(a + b), "arithmetic", "en"))
    for a, b in PRODUCTS:
        train += [row(f"What is {a} times {b}?", f"{a * b}"),
                  row(f"{a}乘以{b}等于多少？", f"{a}乘以{b}等于{a * b}。")]
        held.append(eval_row(f"What is {a} multiplied by {b}?", f"{a * b}", str(a * b), "arithmetic", "en"))
    return train, held


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    train, held = build()
    write_jsonl(HERE / "general.jsonl", train)
    write_jsonl(HERE / "general_eval.jsonl", held)
    print(f"general.jsonl: {len(train)} rows, general_eval.jsonl: {len(held)} rows")
