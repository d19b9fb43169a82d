// The session page: the player, and the commands' timeline under it.
// Clicking a time seeks the player there; while it plays, the command it
// has reached is highlighted.
"use strict";

(function () {
  const box = document.getElementById("player");
  const clock = document.getElementById("clock");
  const timeline = document.getElementById("timeline");
  if (!box || typeof AsciinemaPlayer === "undefined") {
    return;
  }
  const player = AsciinemaPlayer.create(box.dataset.cast, box, {
    preload: true,
    fit: "width",
  });
  const commands = Array.from(timeline.querySelectorAll("li[id^='ei-']"));
  let current = null;

  function show(t) {
    clock.value = "+" + t.toFixed(3) + "s";
    let reached = null;
    for (const row of commands) {
      if (Number(row.dataset.t) > t + 0.0005) {
        break;
      }
      reached = row;
    }
    if (reached === current) {
      return;
    }
    if (current) {
      current.classList.remove("current");
    }
    current = reached;
    if (current) {
      current.classList.add("current");
      // Within the timeline only: the page stays where the reviewer is.
      const top = current.offsetTop - timeline.offsetTop;
      if (top < timeline.scrollTop || top > timeline.scrollTop + timeline.clientHeight - current.offsetHeight) {
        timeline.scrollTop = top - timeline.clientHeight / 3;
      }
    }
  }

  function seek(t) {
    return player.seek(t).then(() => show(player.getCurrentTime()));
  }

  document.addEventListener("click", (event) => {
    const link = event.target.closest("a.seek");
    if (!link) {
      return;
    }
    event.preventDefault();
    seek(Number(link.dataset.t));
  });

  setInterval(() => show(player.getCurrentTime() || 0), 200);

  if (box.dataset.at) {
    seek(Number(box.dataset.at));
    const focus = document.querySelector(".proc.focus");
    if (focus) {
      focus.scrollIntoView({ block: "center" });
    }
  }
})();
