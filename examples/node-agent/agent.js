// agent.js: an agentbus agent in Node.js, written from docs/protocol.md alone.
//
//   BUS_ENDPOINT=tcp://127.0.0.1:5555 AGENT_ID=node-1 node agent.js
//
// It walks at random, never straight back into what it just bumped into.  Everything the
// spec asks of an agent is here: HELLO (repeated until WELCOME, with the WELCOME's token
// once it has one), the ready HEARTBEAT, one ACTION per OBSERVATION with its tick,
// heartbeats when idle, HELLO again when the coordinator has forgotten it, a fresh socket
// when the coordinator goes silent, stopping when another process takes its id, and BYE on
// SIGTERM.  `bus-conformance -- node agent.js` checks it.
"use strict";

const zmq = require("zeromq");
const { encode, decode } = require("@msgpack/msgpack");

const endpoint = process.env.BUS_ENDPOINT || "tcp://127.0.0.1:5555";
const agentId = process.env.AGENT_ID || `node-${process.pid}`;
const VERSION = 1;
const HELLO = 1, WELCOME = 2, OBSERVATION = 3, ACTION = 4, HEARTBEAT = 5, BYE = 6, ERROR = 7;
const NOT_REGISTERED = 7, SHUTTING_DOWN = 10, REPLACED = 16, DROPPED = 18, WORLD_FAULT = 19;
const FORGOTTEN = new Set([NOT_REGISTERED, SHUTTING_DOWN, DROPPED, WORLD_FAULT]);
const OBSTACLE = 1, AGENT = 3, WALL = 4, STAY = 4;

let stopping = false;
process.on("SIGTERM", () => { stopping = true; });
process.on("SIGINT", () => { stopping = true; });

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function connect() {
  // receiveTimeout bounds every wait: the loop wakes at least every 100 ms
  const sock = new zmq.Dealer({ linger: 0, receiveTimeout: 100 });
  sock.connect(endpoint);
  return sock;
}

let lastMove = STAY;
function choose(obs) {
  const bumped = [OBSTACLE, AGENT, WALL].includes(obs[obs.length - 1]);
  const moves = [0, 1, 2, 3, 4].filter((a) => !(bumped && a === lastMove));
  lastMove = moves[Math.floor(Math.random() * moves.length)];
  return lastMove;
}

async function main() {
  let sock = connect();
  let token = null, registered = false;
  let heartbeatMs = 500, expiryMs = 1500;          // until WELCOME says otherwise
  let lastSent = 0, lastHeard = Date.now();
  const send = async (...fields) => {
    await sock.send(Buffer.from(encode([VERSION, ...fields])));
    lastSent = Date.now();
  };
  const hello = () => send(HELLO, agentId, "node-walker", process.pid, ...(token ? [token] : []));

  await hello();
  while (!stopping) {
    let frames = null;
    try {
      frames = await sock.receive();
    } catch (err) {
      if (err.code !== "EAGAIN") throw err;       // EAGAIN: nothing within receiveTimeout
    }
    if (frames) {
      lastHeard = Date.now();
      const msg = decode(frames[0]);
      const type = msg[1];
      if (type === WELCOME) {                      // [1, 2, session, agent_id, params]
        const params = msg[4];
        token = params.token || token;
        heartbeatMs = params.heartbeat_ms;
        expiryMs = params.heartbeat_ms * params.liveness;
        registered = true;
        await send(HEARTBEAT);                     // built our (trivial) model: ready
      } else if (type === OBSERVATION && registered) {   // [1, 3, tick, obs]
        await send(ACTION, msg[2], choose(msg[3]), 0);
      } else if (type === ERROR && FORGOTTEN.has(msg[2])) {
        registered = false;
        await hello();
      } else if (type === ERROR && msg[2] === REPLACED) {
        registered = false;                        // another process holds our id: stop
        break;
      } else if (type === BYE) {
        registered = false;                        // the coordinator is leaving; silence will reconnect us
      }
    }
    const now = Date.now();
    if (now - lastHeard > expiryMs) {              // the coordinator went silent: a fresh socket
      sock.close();
      await sleep(500);
      sock = connect();
      registered = false;
      lastHeard = Date.now();
      await hello();
    } else if (now - lastSent >= heartbeatMs) {
      if (registered) await send(HEARTBEAT); else await hello();   // HELLO repeats until WELCOME
    }
  }
  if (registered) await send(BYE, "stopping");
  await sleep(200);
  sock.close();
}

main().catch((err) => {
  console.error(`agent ${agentId}: ${err.stack || err}`);
  process.exit(1);
});
