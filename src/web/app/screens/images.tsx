// Images: the "New image" dialog (create the image, upload the file with a progress bar) and
// the tag editor of an image (default, head, custom tags; expiry for running VMs on a move).
export function NewImageDialog(props: { osfId?: number; onClose: () => void; onCreated: (id: number) => void }) {
  return <p class="muted">New image: not built yet. <button type="button" onClick={props.onClose}>Close</button></p>;
}

export function ImageTags(props: { di: { id: number; [k: string]: unknown }; onChange: () => void }) {
  return <p class="muted">Tags: not built yet.</p>;
}
