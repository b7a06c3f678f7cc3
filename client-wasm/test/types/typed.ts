// Type-checked (never run) by `npm run test:types`: typed topics (`client.topic<T>`) take
// and give only `T`; each `@ts-expect-error` line proves a wrong use is refused.
import { Client, TreeKey, WhispeerError, type TypedTopic, type Message, type Subscription } from 'whispeer';

interface MyData {
  name: string;
  id: number;
}

const client = await Client.connect('ws://127.0.0.1:7480', { keys: TreeKey.generate('types') });
const t: TypedTopic<MyData> = client.topic<MyData>('some-event', { type: 'myapp.MyData/v1' });
const name: string = t.name;
const tag: string = t.type;
const ct: string = t.contentType;
await t.publish({ name: 'a', id: 1 }, { qos: 1 });
// @ts-expect-error: another type
await t.publish({ name: 'a' });
// @ts-expect-error: the type tag is required
client.topic<MyData>('some-event', {});
// @ts-expect-error: no such option
client.topic<MyData>('some-event', { type: 'x', compression: 'none' });

const sub: Subscription<MyData> = await t.subscribe(
  (m: Message<MyData>) => {
    const id: number = m.value.id;
    // @ts-expect-error: MyData has no such field
    m.value.other;
    void id;
  },
  {
    qos: 1,
    onError: (e: WhispeerError) => {
      const code: string = e.code;
      const expected: string | undefined = e.expected;
      const found: string | undefined = e.found;
      void code, expected, found;
    },
  },
);
const typeTag: string | undefined = sub.type;
const refused: number = sub.typeMismatches;
for await (const m of await t.subscribe({ replay: { last: 1 } })) {
  const n: string = m.value.name;
  void n;
}
const mismatches: number = client.stats().typeMismatches;
void name, tag, ct, typeTag, refused, mismatches;
