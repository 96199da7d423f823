/**
 * spunnel-jupyter's frontend: a launcher tile and a palette command ("Jupyter on a compute node")
 * that open one panel to start, watch, open and stop the session. Every other plugin it uses is
 * optional: in JupyterLab the panel opens in the main area; in Notebook 7, whose main area holds
 * one page, it is a tab of the file browser page (Files, Running, Compute node).
 *
 * A second plugin, `spunnel-jupyter:node` (node.ts), runs only in the Jupyter of a session on its
 * compute node, where the launcher disables this panel: no sessions from sessions.
 */
import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget, WidgetTracker } from '@jupyterlab/apputils';
import { PageConfig } from '@jupyterlab/coreutils';
import { ILauncher } from '@jupyterlab/launcher';
import { LabIcon } from '@jupyterlab/ui-components';
import { INotebookTree } from '@jupyter-notebook/tree';

import svgstr from '../style/icons/compute-node.svg';
import { SpunnelAPI } from './api';
import { nodePlugin } from './node';
import { SpunnelPanel } from './panel';

const COMMAND = 'spunnel:open';
const CATEGORY = 'HPC';

export const computeNodeIcon = new LabIcon({ name: 'spunnel:compute-node', svgstr });

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'spunnel-jupyter:plugin',
  description: 'Start Jupyter on a Slurm compute node from JupyterLab.',
  autoStart: true,
  optional: [ILauncher, ICommandPalette, ILayoutRestorer, INotebookTree],
  activate: (
    app: JupyterFrontEnd,
    launcher: ILauncher | null,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    notebookTree: INotebookTree | null
  ) => {
    // Notebook 7 pages other than the file browser (a notebook, an editor) have no room for it.
    if (PageConfig.getOption('notebookPage') && !notebookTree) {
      return;
    }
    const open = notebookTree ? inNotebookTree(notebookTree) : inMainArea(app, restorer);
    app.commands.addCommand(COMMAND, {
      label: 'Jupyter on a compute node',
      caption: 'Start Jupyter on a Slurm compute node, tunnelled back here',
      icon: computeNodeIcon,
      execute: open
    });
    launcher?.add({ command: COMMAND, category: CATEGORY, rank: 1 });
    palette?.addItem({ command: COMMAND, category: CATEGORY });
  }
};

function newPanel(): SpunnelPanel {
  const panel = new SpunnelPanel(new SpunnelAPI());
  panel.title.icon = computeNodeIcon;
  return panel;
}

/** JupyterLab: one panel (a user has one session per login host) in the main area. */
function inMainArea(
  app: JupyterFrontEnd,
  restorer: ILayoutRestorer | null
): () => MainAreaWidget<SpunnelPanel> {
  const tracker = new WidgetTracker<MainAreaWidget<SpunnelPanel>>({ namespace: 'spunnel' });
  void restorer?.restore(tracker, { command: COMMAND, name: () => 'spunnel' });
  return () => {
    let widget = tracker.currentWidget;
    if (!widget || widget.isDisposed) {
      widget = new MainAreaWidget({ content: newPanel() });
      widget.id = 'spunnel-main';
      widget.title.label = 'Compute node';
      widget.title.icon = computeNodeIcon;
      void tracker.add(widget);
    }
    if (!widget.isAttached) {
      app.shell.add(widget, 'main');
    }
    app.shell.activateById(widget.id);
    // The launcher replaces itself with a widget a command returns.
    return widget;
  };
}

/** Notebook 7: a tab of the file browser page, next to Files and Running. */
function inNotebookTree(tree: INotebookTree): () => void {
  const panel = newPanel();
  panel.title.closable = false; // the command only brings it to the front
  tree.addWidget(panel);
  return () => {
    tree.currentWidget = panel;
  };
}

export default [plugin, nodePlugin];
