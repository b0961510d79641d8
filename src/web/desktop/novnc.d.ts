// The part of noVNC's RFB class (node_modules/@novnc/novnc/core/rfb.js, the package's only
// export) that the desktop page uses; the package ships no types.
declare module "@novnc/novnc" {
  export default class RFB extends EventTarget {
    /** `channel` may be an open WebSocket: noVNC takes over its onmessage/onclose/onerror. */
    constructor(target: HTMLElement, channel: string | WebSocket, options?: { shared?: boolean });
    resizeSession: boolean;
    scaleViewport: boolean;
    focusOnClick: boolean;
    showDotCursor: boolean;
    disconnect(): void;
    focus(options?: FocusOptions): void;
    clipboardPasteFrom(text: string): void;
  }
}
