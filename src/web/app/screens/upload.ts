// Uploads an image file with progress: XMLHttpRequest, because fetch reports no upload
// progress. The body is the file itself (the browser streams it from disk and sets
// Content-Length, which the server checks against what arrives).
import { api, ApiError, BASE } from "../api.ts";

export interface Upload {
  done: Promise<unknown>;
  abort: () => void;
}

export class UploadAborted extends Error {
  constructor() {
    super("the upload was cancelled");
  }
}

export function uploadImage(diId: number, file: File, onProgress: (sent: number, total: number) => void): Upload {
  const xhr = new XMLHttpRequest();
  const done = new Promise<unknown>((resolve, reject) => {
    xhr.open("PUT", `${BASE}/dis/${diId}/image`);
    xhr.setRequestHeader("x-qvd-source", "wat");
    xhr.setRequestHeader("content-type", "application/octet-stream");
    xhr.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size);
    xhr.onabort = () => reject(new UploadAborted());
    xhr.onerror = () => reject(new ApiError("the connection to the server broke during the upload", 0));
    xhr.onload = () => {
      let body: any;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = undefined;
      }
      if (xhr.status >= 200 && xhr.status < 300) return resolve(body);
      // A 401 means the session ended: any API call now starts the app's session-expired flow.
      if (xhr.status === 401) void api.get("/session").catch(() => {});
      reject(new ApiError(body?.error?.message ?? `the server answered ${xhr.status}`, xhr.status, body?.error?.field));
    };
    xhr.send(file);
  });
  return { done, abort: () => xhr.abort() };
}

/** "12.3 MB" */
export function bytes(n: number): string {
  const units = ["bytes", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i++;
  }
  return i === 0 ? `${n} bytes` : `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}
