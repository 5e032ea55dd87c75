"""Default calibration data for the sparse-gguf converter.

The converter runs a small chat model (SmolLM2-135M-Instruct by default) over
this material and records which FFN neurons fire, so that rarely active
neurons can be identified and handled sparsely at inference time.  For the
statistics to be useful the input has to look like real usage, so the data is
deliberately mixed:

* ``CALIBRATION_TEXTS`` -- about twenty passages of varied English text:
  narrative prose, encyclopedic writing (science, history, geography, cooking,
  finance), a casual dialogue, a customer-support exchange, how-to steps,
  numbered and bulleted lists, an email, a news report, a product review,
  Python source, a shell session with a config file, JSON, worked math word
  problems and a poem.
* ``CHAT_PROMPTS`` -- forty one-line requests of the kind people send to a
  small assistant.  These are used for data-free calibration: the model is
  asked to answer them itself and the activations of its own replies are
  recorded.
* ``TEXT_PROMPTS`` -- forty openings of plain text (a story, a recipe, code,
  a letter, ...) for models without a chat template: the model continues
  each one and the activations of its continuation are recorded.

All texts and prompts in this module were written specifically for this
project; they are not excerpts from any external corpus.  They intentionally
avoid the topics used by the held-out evaluation set elsewhere in the
repository, so that calibration does not leak into evaluation.
"""

from __future__ import annotations

__all__ = ["CALIBRATION_TEXTS", "CHAT_PROMPTS", "TEXT_PROMPTS"]


# ---------------------------------------------------------------------------
# Narrative prose
# ---------------------------------------------------------------------------

_NARRATIVE_RADIO = """\
The storm arrived an hour before anyone expected it, and by the time Mira had \
pulled the shutters closed the lane outside her grandfather's house was a \
brown river. The power went out with a soft click, as if someone had simply \
decided the evening was over. Her grandfather did not seem bothered. He lit two \
candles, set them on the workbench in the back room, and lifted an old radio \
down from the top shelf, blowing the dust off its wooden case.

"It has not worked since your mother was small," he said. "Let us see if it \
remembers how."

Mira had never seen the inside of a radio. When he unscrewed the back panel \
she expected a tangle of wires, but the parts were arranged almost politely: \
glass tubes standing in a row like chess pieces, a paper cone for the speaker, \
a dial string wound around a little brass wheel. Her grandfather pointed at \
each piece and named it, and she repeated the names under her breath so she \
would not forget them.

They found the problem near midnight. A single wire had come loose from its \
terminal, its copper end green with age. He let her hold the soldering iron, \
which he heated on a camping stove, and guided her hand until the bright bead \
of metal flowed into place. When he connected the battery pack, nothing \
happened for a long moment. Then the tubes began to glow a faint orange, and a \
voice crackled out of the speaker, reading the weather forecast for the coast.

"Heavy rain overnight," the voice said, "clearing by morning."

Her grandfather laughed so hard he had to sit down. Mira turned the dial \
slowly, listening to music drift in and out of the static, and decided that \
this, not the storm, was what she would remember about the summer.
"""

_NARRATIVE_STATION = """\
Station Halden sat on the rim of the crater like a tin can someone had \
forgotten to pick up. Tomas had lived there for fourteen months, long enough \
that the hum of the air scrubbers had become a kind of silence. His job was \
simple on paper: keep the drills running, send the core samples up to the \
orbiter every ninth day, and write a report nobody seemed to read.

On the morning the signal came, he was eating reconstituted eggs and arguing \
with the maintenance robot about whether it had actually cleaned the filters. \
The console chimed twice, which it never did. Tomas put his fork down and \
looked at the screen. A short burst of data had arrived from the east ridge, \
where there were no instruments, no cables, and as far as he knew no reason \
for anything to be transmitting at all.

He played it back three times. It was not a voice, and it was not noise. It \
was a pattern: seven pulses, a pause, then seven more, each slightly longer \
than the last. He checked the calibration logs, then the clock, then the logs \
again. Everything was normal except for the thing that was not.

The sensible choice was to report it and wait. The orbiter would reply in two \
days, and someone with a better title would decide what to do. Tomas sat for \
a long time with his hands flat on the table. Then he stood up, pulled his \
suit off the rack, and told the robot to keep the kettle warm. The ridge was \
four kilometers away. If he walked steadily, he could be back before the \
light changed.
"""

# ---------------------------------------------------------------------------
# Expository / encyclopedic prose
# ---------------------------------------------------------------------------

_SCIENCE_IMMUNE = """\
The immune system protects the body by recognizing molecules that do not \
belong to it. When a virus or bacterium enters the bloodstream, specialized \
white blood cells called macrophages engulf it and display fragments of its \
proteins on their surfaces. These fragments, known as antigens, are shown to \
helper T cells, which coordinate the rest of the response. Helper T cells \
activate B cells, which produce antibodies: Y-shaped proteins that bind \
tightly to a specific antigen and mark the invader for destruction.

The first time the body meets a new pathogen, this process is slow. It can \
take a week or more for enough antibodies to be produced, and during that time \
a person may become seriously ill. However, once the infection has been \
cleared, some of the B cells and T cells remain in the body as memory cells. \
If the same pathogen appears again, the memory cells recognize it almost \
immediately and the response is faster and much stronger. Often the second \
infection is defeated before any symptoms appear.

Vaccines take advantage of this memory. A vaccine exposes the immune system \
to a harmless version of an antigen, such as an inactivated virus, a single \
purified protein, or genetic instructions that let the body's own cells make \
that protein for a short time. The immune system responds as if a real \
infection were under way and produces memory cells, without the person having \
to suffer the disease itself. Some vaccines provide protection for life, \
while others need booster doses because the memory fades or because the \
pathogen changes its surface proteins over time. Influenza is a well-known \
example of the second case, which is why a new seasonal vaccine is prepared \
each year.
"""

_HISTORY_PRINTING = """\
Before the middle of the fifteenth century, nearly every book in Europe was \
copied by hand. A skilled scribe might need several months to produce a \
single Bible, and books were therefore rare, expensive, and concentrated in \
monasteries, universities and the libraries of wealthy families. Printing \
from carved wooden blocks had been practiced in East Asia for centuries, and \
movable type made of ceramic and later metal had been developed in China and \
Korea, but these techniques had spread slowly to the West.

Around 1450, Johannes Gutenberg, a goldsmith working in the German city of \
Mainz, combined several existing technologies into a practical system. He \
cast individual letters from a metal alloy of lead, tin and antimony, which \
melted at a low temperature but hardened into durable type. He developed an \
oil-based ink that clung to metal better than the water-based inks used by \
scribes, and he adapted the screw press, already familiar to winemakers, to \
press paper evenly against the inked type.

The results spread with remarkable speed. By 1500, printing shops were \
operating in more than two hundred European cities, and historians estimate \
that millions of volumes had been produced. Cheaper books encouraged literacy, \
allowed scholars in different countries to work from identical texts, and \
made it far easier for new ideas, religious, scientific and political, to \
travel beyond the control of the authorities who had once governed what was \
copied. Many historians regard the printing press as one of the conditions \
that made the Reformation and the Scientific Revolution possible.
"""

_GEOGRAPHY_ATACAMA = """\
The Atacama Desert stretches for roughly one thousand kilometers along the \
Pacific coast of South America, mostly within northern Chile. It is often \
described as the driest nonpolar place on Earth. Some weather stations in its \
interior have recorded average rainfall of only a millimeter or two per year, \
and there are valleys where no rain has been measured for decades.

Several factors combine to produce this extreme dryness. To the east, the \
Andes mountains block moist air arriving from the Amazon basin. To the west, \
the cold Humboldt Current cools the air above the ocean, which prevents it \
from rising and forming rain clouds. A persistent high-pressure system over \
the southeastern Pacific adds to the effect by pushing air downward, where it \
warms and dries further.

Despite these conditions, the Atacama is not lifeless. Along the coast, thick \
fogs called camanchaca roll in from the sea, and some plants and lichens \
survive by capturing droplets of water from the mist. In rare years when \
unusual rain does fall, the desert floor can erupt with wildflowers in an \
event local people call the desierto florido. The region is also rich in \
minerals, including copper, lithium and nitrates, and mining has shaped its \
economy for more than a century. Its clear, dry skies and high altitude have \
made it one of the best places in the world for astronomy, and several major \
observatories operate on its mountaintops.
"""

_COOKING_RISOTTO = """\
Risotto is a northern Italian rice dish made by cooking short-grain rice \
slowly in broth until it becomes creamy. The creaminess does not come from \
cream at all, but from starch released by the surface of the rice grains as \
they are stirred. Varieties such as Arborio, Carnaroli and Vialone Nano are \
preferred because they contain a large amount of this starch while keeping a \
firm center.

A basic risotto begins with a soffritto: finely chopped onion softened gently \
in butter or olive oil without letting it brown. The dry rice is then added \
and stirred for a minute or two so that each grain is coated in fat and \
becomes slightly translucent at the edges. This step, called tostatura, helps \
the grains hold their shape. A splash of dry white wine is usually poured in \
next and allowed to evaporate.

The broth should be kept hot in a separate pot. It is added one ladle at a \
time, and the cook waits until most of the liquid has been absorbed before \
adding more. Frequent stirring releases starch and prevents sticking. After \
about seventeen to twenty minutes the rice should be tender but still have a \
slight bite. The pot is then removed from the heat and the mantecatura \
begins: cold butter and grated Parmesan are beaten in vigorously, giving the \
dish its glossy, flowing texture. A properly made risotto should spread \
slowly when spooned onto a plate rather than standing in a stiff mound. \
Mushrooms, saffron, peas, squash or seafood can all be added to the basic \
method.
"""

_FINANCE_COMPOUND = """\
Compound interest is the process by which interest is earned not only on an \
original sum of money but also on the interest that has already been added to \
it. If you deposit 1,000 dollars in an account that pays 5 percent per year, \
you will have 1,050 dollars after the first year. In the second year the 5 \
percent is calculated on 1,050 dollars, so you earn 52.50 dollars rather than \
50. The difference seems small at first, but over long periods it grows \
dramatically. After thirty years at the same rate, the original 1,000 dollars \
would be worth about 4,322 dollars, even though no further money was added.

A useful shortcut for estimating growth is the rule of 72. Dividing 72 by the \
annual interest rate gives an approximate number of years for an investment \
to double. At 6 percent, money doubles in about twelve years; at 9 percent, \
in about eight.

The same principle works against borrowers. Credit card balances often carry \
interest rates above 20 percent, and unpaid interest is added to the balance \
each month, so a debt can grow quickly if only the minimum payment is made. \
For this reason, many financial planners suggest paying off high-interest \
debt before investing.

For long-term savers, compounding is one reason that starting early matters \
more than the exact amount saved. Low-cost index funds, which hold a broad \
selection of stocks and aim to match the market rather than beat it, are a \
popular way to benefit from compounding because their low fees leave more of \
the return invested. Returns on stocks are not guaranteed, however, and \
values can fall sharply in the short term.
"""

# ---------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------

_DIALOGUE_CAMPING = """\
Sam: Hey, are you still up for the camping trip this weekend?
Priya: Definitely. I already told my boss I'm leaving early on Friday.
Sam: Nice. I was thinking we'd drive up to Pine Hollow. The lake campsites \
are first come, first served, so we should get there before three.
Priya: Works for me. Do you still have that big tent, or should I bring mine?
Sam: I lent the big one to my brother and he hasn't given it back yet. Bring \
yours, it's lighter anyway.
Priya: Okay. What about food? Last time we had way too many snacks and not \
enough actual meals.
Sam: Ha, true. I can do dinner on Friday, maybe pasta with sausage on the \
camp stove. You want to handle Saturday?
Priya: Sure, I'll make chili at home and just reheat it. And I'll bring \
coffee, because I'm not surviving a morning without it.
Sam: Obviously. Did you check the weather?
Priya: Sunny on Saturday, but there's a chance of showers Sunday morning.
Sam: Then let's pack up early on Sunday and grab breakfast at that diner on \
the way back, the one with the huge pancakes.
Priya: Deal. Should we invite Marcus?
Sam: I asked him. He said maybe, which means probably not.
Priya: Classic Marcus. Okay, I'll pick you up at noon on Friday. Don't forget \
the headlamps this time.
Sam: That was one time! Fine, headlamps, bug spray, and extra batteries. See \
you Friday.
"""

_SUPPORT_ROUTER = """\
Customer: Hi, my internet has been dropping out every few minutes since \
yesterday evening. I've already restarted the router twice.
Agent: Hello, and thanks for contacting us. I'm sorry to hear about the \
connection problems. I'd be happy to help. Could you tell me which lights are \
showing on the front of your router right now?
Customer: The power light is green, the internet light keeps switching \
between green and orange, and the Wi-Fi light is solid blue.
Agent: Thank you, that's helpful. An orange internet light usually means the \
router is losing its connection to our network, rather than a problem with \
your Wi-Fi. I've just run a line test from my side, and I can see some \
signal errors on your line. Is the cable from the wall socket to the router \
firmly plugged in at both ends?
Customer: Let me check. Oh, the end at the wall was a bit loose. I've pushed \
it back in.
Agent: Great. Please give it about two minutes and let me know whether the \
internet light stays green.
Customer: It's been green for a few minutes now, and the page I had open \
loaded straight away.
Agent: Excellent. I'm running the line test again, and the errors have \
cleared. I'll keep your case open for forty-eight hours. If the connection \
drops again, reply to this chat and we can arrange for an engineer to check \
the line outside your home at no charge.
Customer: Perfect, thank you so much. That was much easier than I expected.
Agent: You're very welcome. Is there anything else I can help you with today?
Customer: No, that's everything. Have a good day.
Agent: You too. Thanks for being with us.
"""

# ---------------------------------------------------------------------------
# Instructions and lists
# ---------------------------------------------------------------------------

_HOWTO_BIKE_TIRE = """\
How to fix a flat bicycle tire

You will need a set of tire levers, a patch kit or a spare inner tube, and a \
pump that fits your valve type.

Step 1: Remove the wheel. Shift to the smallest rear cog if you are working \
on the back wheel, open the brake release if your bike has rim brakes, and \
then open the quick-release lever or loosen the axle nuts.

Step 2: Let out any remaining air. Insert a tire lever under the bead of the \
tire, opposite the valve, and hook it onto a spoke. Insert a second lever a \
few inches away and slide it around the rim until one side of the tire comes \
free.

Step 3: Pull the inner tube out, starting opposite the valve and finishing by \
pushing the valve out through the rim.

Step 4: Find the cause. Pump a little air into the tube and listen for the \
leak, or hold it under water and watch for bubbles. Then run your fingers \
carefully around the inside of the tire to find any thorn, glass or wire that \
is still stuck in it. If you skip this step, the new tube will probably go \
flat again.

Step 5: Patch or replace the tube. To patch, roughen the area with the \
sandpaper from the kit, apply a thin layer of glue, wait until it turns dull, \
and press the patch on firmly.

Step 6: Put a small amount of air in the tube so it holds its shape, insert \
the valve, tuck the tube into the tire, and push the bead back over the rim \
with your thumbs. Avoid using levers for this part, as they can pinch the \
tube.

Step 7: Inflate to the pressure printed on the side of the tire, refit the \
wheel, and close the brakes before riding.
"""

_NUMBERED_STUDY_TIPS = """\
Ten practical tips for preparing for an exam:

1. Start at least two weeks early, so you can study in short sessions rather \
than one long, exhausting night.
2. Collect the syllabus, past papers and your notes before you begin, so you \
know exactly what material will be covered.
3. Break the material into topics and schedule each one on a calendar.
4. Test yourself instead of rereading. Close the book and try to write down \
everything you remember, then check what you missed.
5. Use spaced repetition: review each topic again after one day, three days \
and one week.
6. Practice with past exam questions under timed conditions.
7. Explain difficult ideas out loud, as if you were teaching a friend. Gaps in \
your understanding become obvious very quickly.
8. Take a five-minute break every half hour, and stand up or walk around.
9. Sleep at least seven hours, especially the night before the exam, because \
memory is consolidated during sleep.
10. On the day itself, eat a proper breakfast, arrive early, and read every \
question carefully before you start writing.
"""

_BULLETED_PACKING = """\
Packing list for a four-day business trip:

Clothing
- Two pairs of trousers and one smart jacket
- Four shirts, plus one spare in case of spills
- Comfortable shoes for walking and one pair of formal shoes
- Socks, underwear and something to sleep in
- A light sweater for air-conditioned meeting rooms

Electronics
- Laptop and charger
- Phone charger and a short spare cable
- Travel adapter if you are crossing a border
- Noise-cancelling headphones for the flight

Documents
- Passport or ID card
- Printed copy of the hotel booking and the meeting agenda
- Company credit card and a small amount of local cash

Toiletries
- Toothbrush, toothpaste and deodorant
- Any prescription medication, kept in your hand luggage
- Small bottles under the airline liquid limit

Extras
- A reusable water bottle
- A notebook and two pens
- Business cards
- Snacks for the journey
"""

# ---------------------------------------------------------------------------
# Email, news, review
# ---------------------------------------------------------------------------

_EMAIL_MEETING = """\
Subject: Moving Thursday's project review to Friday

Hi Daniel,

I hope your week is going well. I wanted to let you know that we need to \
move Thursday's project review to Friday at 10:30, because two members of the \
design team will be at the supplier visit on Thursday and I'd like everyone \
to be in the room when we go through the timeline.

The meeting will still be in the third-floor conference room, and it should \
take about an hour. Before then, could you send me the updated budget figures \
for the second quarter? If the numbers for the testing phase are still not \
final, a rough estimate is fine for now; we can mark it as provisional in the \
slides.

Please also let me know if Friday doesn't work for you. I can shift it to \
the afternoon if necessary, but the morning is better for most of the group.

Thanks, and see you then.

Best regards,
Elena Novak
Project Coordinator
"""

_NEWS_SOLAR = """\
City council approves solar farm on former landfill site

The city council voted eight to three on Tuesday night to approve a 40-acre \
solar farm on the site of the old Westfield landfill, which has been closed \
since 2004. Officials say the project will generate enough electricity to \
power around 6,000 homes and will be completed within two years.

The farm will be built and operated by a private energy company under a \
25-year lease. The city will receive annual rent payments and a share of the \
revenue, which the finance department estimates at about 1.2 million dollars \
a year once the farm is running at full capacity.

"This land has been sitting empty for two decades because nobody can build \
houses on it," said council member Rosa Delgado, who introduced the proposal. \
"Now it can do something useful for the whole community."

Not everyone was convinced. Several residents who live near the site spoke \
during the public comment period, raising concerns about construction \
traffic and the effect of the panels on views from nearby hiking trails. \
Council member Frank Ostrowski, who voted against the plan, said the lease \
terms were too favorable to the developer and argued that the city should \
have sought more bids.

Environmental engineers told the council that the panels would be mounted on \
concrete ballasts rather than driven into the ground, so the protective cap \
covering the old waste would not be disturbed. Construction is expected to \
begin in the spring, and the company has promised to plant native grasses \
and a row of trees along the eastern boundary to screen the site.
"""

_REVIEW_HEADPHONES = """\
Review: Lumen Q3 wireless headphones. Rating: four out of five stars.

I have been using the Lumen Q3 headphones every day for about six weeks, \
mostly on my commute and while working from home, and overall I am very \
impressed.

The sound is warm and detailed. Bass is strong without drowning out vocals, \
which was a problem with my previous pair, and acoustic tracks sound \
especially clear. The noise cancellation is not quite as good as the most \
expensive models on the market, but it easily removes the rumble of a train \
and most office chatter.

Comfort is excellent. The ear cushions are soft and deep, and I can wear \
them for three or four hours without any pressure on my head. They also fold \
flat into a slim case, which fits in my backpack.

Battery life is a genuine strength. The company claims thirty hours with \
noise cancellation on, and in my testing I got a little over twenty-eight. A \
ten-minute charge gives roughly four hours of playback, which has saved me \
more than once.

There are a few downsides. The touch controls on the right ear cup are too \
sensitive; I often pause the music by accident when adjusting the \
headphones. The companion app is slow and asks for more permissions than it \
needs. Finally, the microphone is only average on calls, and several \
colleagues said I sounded distant in a busy cafe.

At its current price, the Q3 offers excellent value. If you want great \
sound, all-day comfort and long battery life, and you can live with the \
fiddly controls, I recommend it.
"""

# ---------------------------------------------------------------------------
# Code, shell, config, JSON
# ---------------------------------------------------------------------------

_PYTHON_CLASS = '''\
from collections import OrderedDict


class LRUCache:
    """A small least-recently-used cache with a fixed capacity."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        # OrderedDict remembers insertion order, and move_to_end lets us
        # mark an entry as the most recently used in constant time.
        self._data: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key, default=None):
        """Return the cached value for key, or default if it is missing."""
        if key not in self._data:
            self.misses += 1
            return default
        self.hits += 1
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key, value) -> None:
        """Insert or update a value, evicting the oldest entry if full."""
        if key in self._data:
            self._data.move_to_end(key)
        self._data[key] = value
        if len(self._data) > self.capacity:
            # popitem(last=False) removes the least recently used item.
            oldest, _ = self._data.popitem(last=False)
            print(f"evicted {oldest!r}")

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __len__(self) -> int:
        return len(self._data)


if __name__ == "__main__":
    cache = LRUCache(capacity=2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.get("a")          # "a" is now the most recently used
    cache.put("c", 3)       # evicts "b"
    print(len(cache), cache.get("b"), f"{cache.hit_rate():.2f}")
'''

_PYTHON_DATA = r'''import csv
from collections import defaultdict
from datetime import datetime
from pathlib import Path


def summarize_sales(path: Path, min_total: float = 0.0) -> list[dict]:
    """Read a CSV of orders and return monthly totals per region.

    Each row must have the columns: date, region, quantity, unit_price.
    Rows with missing or malformed values are skipped and counted.
    """
    totals: dict[tuple[str, str], float] = defaultdict(float)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    skipped = 0

    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                day = datetime.strptime(row["date"].strip(), "%Y-%m-%d")
                quantity = int(row["quantity"])
                price = float(row["unit_price"])
            except (KeyError, ValueError):
                skipped += 1
                continue
            # Group by calendar month and a normalized region name.
            key = (day.strftime("%Y-%m"), row["region"].strip().title())
            totals[key] += quantity * price
            counts[key] += 1

    if skipped:
        print(f"warning: skipped {skipped} malformed rows")

    summary = [
        {
            "month": month,
            "region": region,
            "orders": counts[(month, region)],
            "revenue": round(total, 2),
        }
        for (month, region), total in totals.items()
        if total >= min_total
    ]
    # Sort by month, then by revenue from highest to lowest.
    summary.sort(key=lambda item: (item["month"], -item["revenue"]))
    return summary


if __name__ == "__main__":
    for line in summarize_sales(Path("orders.csv"), min_total=100):
        print(f"{line['month']}  {line['region']:<12} {line['revenue']:>10.2f}")
'''

_SHELL_CONFIG = """\
$ cd ~/projects/weather-api
$ git status
On branch main
Your branch is up to date with 'origin/main'.
nothing to commit, working tree clean
$ python3 -m venv .venv
$ source .venv/bin/activate
(.venv) $ pip install -r requirements.txt
Collecting flask==3.0.2
Collecting requests==2.31.0
Successfully installed flask-3.0.2 requests-2.31.0
(.venv) $ cat config.ini
[server]
host = 127.0.0.1
port = 8080
debug = false

[cache]
enabled = true
ttl_seconds = 600
max_entries = 500

[logging]
level = INFO
file = logs/app.log
(.venv) $ mkdir -p logs
(.venv) $ python app.py --config config.ini
INFO  Loading configuration from config.ini
INFO  Cache enabled (ttl=600s, max=500)
INFO  Listening on http://127.0.0.1:8080
^C
(.venv) $ ls -la logs
total 12
drwxr-xr-x 2 dev dev 4096 Mar  3 14:02 .
drwxr-xr-x 6 dev dev 4096 Mar  3 14:01 ..
-rw-r--r-- 1 dev dev  212 Mar  3 14:02 app.log
(.venv) $ tail -n 2 logs/app.log
2024-03-03 14:02:11 INFO Listening on http://127.0.0.1:8080
2024-03-03 14:02:40 INFO Shutting down after keyboard interrupt
"""

_JSON_ORDER = """\
{
  "order_id": "A-20931",
  "created_at": "2024-05-14T09:42:17Z",
  "status": "shipped",
  "customer": {
    "name": "Jordan Lee",
    "email": "jordan.lee@example.com",
    "loyalty_member": true
  },
  "shipping_address": {
    "street": "48 Orchard Road",
    "city": "Springfield",
    "postal_code": "62704",
    "country": "US"
  },
  "items": [
    {"sku": "TEA-GRN-100", "name": "Green tea, 100 bags", "quantity": 2, "unit_price": 7.5},
    {"sku": "MUG-CER-WHT", "name": "Ceramic mug, white", "quantity": 1, "unit_price": 12.0},
    {"sku": "HNY-RAW-250", "name": "Raw honey, 250 g", "quantity": 3, "unit_price": 6.25}
  ],
  "discount_code": null,
  "subtotal": 45.75,
  "shipping": 4.99,
  "tax": 3.66,
  "total": 54.40,
  "tracking": {
    "carrier": "ParcelFast",
    "number": "PF839201746",
    "estimated_delivery": "2024-05-17"
  }
}
"""

# ---------------------------------------------------------------------------
# Math word problems
# ---------------------------------------------------------------------------

_MATH_PROBLEMS = """\
Problem 1: A train leaves a station at 2:15 p.m. and travels at an average \
speed of 80 kilometers per hour. How far has it traveled by 5:00 p.m.?
Answer: From 2:15 to 5:00 is 2 hours and 45 minutes, which is 2.75 hours. \
Distance equals speed times time, so 80 times 2.75 equals 220. The train has \
traveled 220 kilometers.

Problem 2: A jacket costs 60 dollars. It is on sale for 25 percent off, and \
then a sales tax of 8 percent is added to the sale price. What is the final \
price?
Answer: 25 percent of 60 is 15, so the sale price is 60 minus 15, or 45 \
dollars. The tax is 8 percent of 45, which is 3.60. The final price is 45 \
plus 3.60, which equals 48.60 dollars.

Problem 3: Maya has twice as many marbles as Leo. Together they have 36 \
marbles. How many does each of them have?
Answer: Let Leo have x marbles. Then Maya has 2x, and x plus 2x equals 36, \
so 3x equals 36 and x equals 12. Leo has 12 marbles and Maya has 24.

Problem 4: A rectangular garden is 12 meters long and 7 meters wide. A path \
1 meter wide runs all the way around the outside of it. What is the area of \
the path?
Answer: The garden and path together measure 14 meters by 9 meters, an area \
of 126 square meters. The garden alone is 12 times 7, or 84 square meters. \
The path covers 126 minus 84, which is 42 square meters.

Problem 5: A recipe needs 3 eggs to make 12 pancakes. How many eggs are \
needed for 30 pancakes?
Answer: Each egg makes 12 divided by 3, which is 4 pancakes. For 30 \
pancakes you need 30 divided by 4, which is 7.5, so in practice you would \
use 8 eggs.
"""

# ---------------------------------------------------------------------------
# Poem
# ---------------------------------------------------------------------------

_POEM_ORCHARD = """\
The Orchard in October

The ladders lean against the trees
like tired men at the end of a shift,
and the wind goes through the branches
counting what the pickers missed.

A single apple, red as a warning,
hangs where no hand could reach;
the wasps have found the fallen ones
and hum their small, drunk speech.

My father walked these rows for years
and knew each tree by name;
he said the good ones never ask
to be remembered, all the same.

So I remember them for him:
the crooked one, the one that split,
the one that fruited twice one spring
and no one could explain it.

The light goes amber, then goes gray.
The crates are stacked and tied.
Tomorrow frost will silver the grass,
and the year will step aside.
"""


CALIBRATION_TEXTS: tuple[str, ...] = (
    _NARRATIVE_RADIO,
    _SCIENCE_IMMUNE,
    _DIALOGUE_CAMPING,
    _PYTHON_CLASS,
    _HISTORY_PRINTING,
    _SUPPORT_ROUTER,
    _NUMBERED_STUDY_TIPS,
    _GEOGRAPHY_ATACAMA,
    _EMAIL_MEETING,
    _SHELL_CONFIG,
    _COOKING_RISOTTO,
    _NEWS_SOLAR,
    _MATH_PROBLEMS,
    _BULLETED_PACKING,
    _PYTHON_DATA,
    _FINANCE_COMPOUND,
    _REVIEW_HEADPHONES,
    _JSON_ORDER,
    _HOWTO_BIKE_TIRE,
    _NARRATIVE_STATION,
    _POEM_ORCHARD,
)


CHAT_PROMPTS: tuple[str, ...] = (
    "What is the difference between weather and climate?",
    "Can you explain how a refrigerator keeps food cold?",
    "Write a short poem about the first snowfall of winter.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Give me five ideas for a birthday party for a ten-year-old.",
    "How do I say 'Where is the train station?' in Spanish?",
    "Write a Python function that checks whether a string is a palindrome.",
    "I have trouble falling asleep at night. Do you have any advice?",
    "What are the main causes of inflation?",
    "List three benefits and three drawbacks of working from home.",
    "Explain photosynthesis to a seven-year-old.",
    "Write a polite email asking my landlord to fix a leaking tap.",
    "What is the capital of Australia, and why isn't it Sydney?",
    "Brainstorm names for a small coffee shop near a university.",
    "How does a binary search work? Show an example.",
    "Translate 'Thank you for your help' into French and German.",
    "What should I look for when buying a used car?",
    "Write a SQL query that finds the ten customers who spent the most.",
    "Can you give me a simple recipe for vegetable soup?",
    "Why is the sky blue?",
    "Help me write a short cover letter for a junior accountant position.",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a 20-minute workout I can do at home without equipment.",
    "Explain what a black hole is in simple terms.",
    "Write a short story opening about a detective who is afraid of the dark.",
    "How can I save money on groceries each month?",
    "What happened during the fall of the Roman Empire?",
    "Give me a bash command to count the lines in all .txt files in a folder.",
    "What are some good habits for keeping a houseplant healthy?",
    "Rewrite this sentence to sound more formal: 'We gotta fix this ASAP.'",
    "How many minutes are there in a week? Show your working.",
    "What are the pros and cons of electric cars?",
    "Explain the difference between RAM and storage on a computer.",
    "Write a haiku about a rainy Monday morning.",
    "My friend is upset with me for missing her party. How should I apologize?",
    "Create a weekly study plan for learning basic Japanese.",
    "What does the term 'machine learning' mean?",
    "Write a JavaScript function that returns the largest number in an array.",
    "Suggest three books for someone who enjoyed science fiction novels.",
    "What is a healthy breakfast I can make in five minutes?",
)


# Openings of plain text, for models without a chat template (base models): the model continues each one and
# the activations of its continuation are recorded, as with CHAT_PROMPTS for chat models. Same genres as
# CALIBRATION_TEXTS; written for this project.
TEXT_PROMPTS: tuple[str, ...] = (
    "The lighthouse keeper had not seen a ship in eleven days when",
    "Chapter One\n\nThe train pulled into the station an hour late, and",
    "Glaciers form where more snow falls in winter than melts in summer. Over many years,",
    "The first public libraries in Europe were",
    "How to repot a houseplant\n\n1. Choose a pot that is",
    "Dear Mr. Alvarez,\n\nThank you for your letter of March 3. I am writing to",
    "def moving_average(values, window):\n    \"\"\"Return the moving average of values.\"\"\"\n",
    "Ingredients:\n- 2 cups of flour\n- 1 teaspoon of salt\n",
    "Q: Why do cats purr?\nA:",
    "In economics, opportunity cost is",
    "The city council voted on Tuesday to",
    "Product review: I bought this kettle three months ago and",
    "$ ls -la /etc/nginx\n",
    "{\n  \"name\": \"weather-station\",\n  \"version\": \"1.4.2\",\n",
    "Problem: A rectangle is 8 cm long and 5 cm wide. What is its area?\nSolution:",
    "The old clock on the wall struck midnight, and",
    "Photosynthesis takes place mainly in the leaves of plants, where",
    "Meeting notes, project kickoff\n\nAttendees:",
    "SELECT customer_id, SUM(amount)\nFROM orders\n",
    "My grandmother always said that the secret to good bread was",
    "The French Revolution began in 1789 when",
    "Volcanoes are openings in the Earth's crust through which",
    "Tips for a job interview:\n\n*",
    "The river wound through the valley like",
    "class Inventory:\n    def __init__(self):\n",
    "To change a car tire safely, first",
    "Interviewer: What made you start the company?\nFounder:",
    "The human heart has four chambers:",
    "Breaking news: heavy snow has closed",
    "Once upon a time, in a village at the edge of a great forest,",
    "A budget is a plan for how you will spend your money.",
    "The rules of chess are simple to learn:",
    "Welcome to the user guide for the X200 printer. This section explains",
    "function debounce(fn, delay) {\n",
    "The Amazon rainforest covers",
    "Day 3 of our hiking trip. We woke up before sunrise and",
    "An email to the team:\n\nHi everyone,\n\n",
    "The theory of plate tectonics explains",
    "Customer: My order arrived damaged.\nAgent:",
    "Autumn leaves were falling on the empty playground as",
)
