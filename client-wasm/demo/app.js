// The demo chat: a key from (room, passphrase) via Argon2id, one topic per room, messages
// as plain JS objects. Everything is sealed and opened by the wasm client in this tab.
import { Client, Identity, TreeKey } from '../js/index.browser.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// This module runs once the WebAssembly module has loaded (the import above awaits it),
// which can be seconds after the page shows: what someone typed meanwhile is kept.
const prefill = (id, value) => {
  if (!$(id).value) $(id).value = value;
};
prefill('relay', params.get('relay') ?? `ws://${location.hostname || '127.0.0.1'}:7070`);
prefill('name', params.get('name') ?? sessionStorage.getItem('whispeer-demo-name') ?? '');
prefill('room', params.get('room') ?? 'lobby');

// One identity per tab (kept across reloads of this tab).
let secret = sessionStorage.getItem('whispeer-demo-identity');
const me = secret ? Identity.fromSecretString(secret) : Identity.generate();
sessionStorage.setItem('whispeer-demo-identity', me.toSecretString());

let client;
let myName;

function setState(state, text) {
  $('state').dataset.state = state;
  $('state').textContent = text ?? state;
}

function addNote(text) {
  const li = document.createElement('li');
  li.className = 'note';
  li.textContent = text;
  $('messages').append(li);
  li.scrollIntoView({ block: 'end' });
}

function addMessage(m) {
  const v = m.value;
  if (!v || typeof v.text !== 'string') return;
  const li = document.createElement('li');
  li.className = 'msg' + (m.sender === me.senderId ? ' mine' : '');
  const who = document.createElement('div');
  who.className = 'who';
  const name = document.createElement('span');
  name.textContent = `${String(v.name ?? '?').slice(0, 40)} `;
  const id = document.createElement('code');
  id.textContent = m.sender ? `${m.sender.slice(0, 12)}…` : 'unsigned';
  id.title = m.sender ? `verified sender ${m.sender}` : 'unsigned message';
  who.append(name, id, ` · ${new Date(m.timestamp).toLocaleTimeString()}`);
  const text = document.createElement('div');
  text.textContent = v.text;
  li.append(who, text);
  $('messages').append(li);
  li.scrollIntoView({ block: 'end' });
}

$('join-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('join').disabled = true;
  $('join-error').textContent = '';
  myName = $('name').value.trim();
  const room = $('room').value.trim();
  sessionStorage.setItem('whispeer-demo-name', myName);
  try {
    setState('deriving', 'deriving key…');
    // Let the state paint before Argon2id (256 MiB) runs on this thread.
    await new Promise((r) => requestAnimationFrame(() => setTimeout(r)));
    const tree = TreeKey.fromPassphrase(`whispeer-demo/${room}`, $('passphrase').value);
    setState('connecting');
    client = await Client.connect($('relay').value.trim(), { keys: tree, identity: me, name: 'whispeer-demo' });
    client.on('state', (s, d) => {
      setState(s, s === 'reconnecting' ? `reconnecting (${d?.attempt})…` : s);
      if (s === 'connected') addNote('reconnected');
    });
    await client.subscribe('messages', addMessage);
    await client.subscribe('presence', (m) => {
      if (m.sender !== me.senderId && m.value?.name) addNote(`${String(m.value.name).slice(0, 40)} joined`);
    });
    $('join-form').hidden = true;
    $('chat').hidden = false;
    $('room-info').textContent = `Room “${room}” as ${myName} · you are ${me.senderId.slice(0, 16)}… · relay ${client.url}`;
    setState('connected');
    await client.publish('presence', { name: myName });
    $('message').focus();
  } catch (e) {
    setState('closed', 'not connected');
    $('join-error').textContent = e.message;
    $('join').disabled = false;
  }
});

$('send-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const text = $('message').value.trim();
  if (!text || !client) return;
  $('message').value = '';
  try {
    await client.publish('messages', { name: myName, text });
  } catch (e) {
    addNote(`not sent: ${e.message}`);
  }
});

// Ready: the join form's handler is in place.
$('join').disabled = false;
